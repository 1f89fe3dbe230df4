"""The markdown report of one run."""

from __future__ import annotations

from vllm_compact.benchmarks.reliability.outcomes import DISCONNECTED, OK, REJECTED


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["# Reliability under load: a live compacting server, bad requests, disconnects, injected faults", "",
             f"Command: `{result['command']}`", ""]
    if result.get("server"):
        srv = result["server"]
        lines += [f"Server: `{srv['env']} {srv['command']}`", ""]
    if result.get("code", {}).get("commit"):
        modified = result["code"]["modified"]
        lines += [f"Code: commit {result['code']['commit'][:12]}"
                  + (f" with local changes to {', '.join(modified)}" if modified else "") + ".", ""]
    lines += [f"{result['settings']['requests']} requests from {result['settings']['concurrency']} concurrent "
              f"clients in {result['wall_s'] / 60:.1f} min.", "",
              "| requests | completed | rejected_4xx | errors_5xx | lost | disconnected | compactions | "
              "faults_injected | leaked_pages | server_alive |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
              f"| {s['requests']} | {s['completed']} | {s['rejected_4xx']} | {s['errors_5xx']} | {s['lost']} | "
              f"{s['disconnected']} | {s['compactions']} | {s['faults_injected']} ({_pct(s['fault_share'])}) | "
              f"{s['leaked_pages']} | {s['server_alive']} |", "",
              f"Free KV pages idle: {s['free_pages_start']} at the start, {s['free_pages_end']} at the end "
              f"(pool: {result['stats_end']['pool']['total_pages'] if result.get('stats_end') else '?'} pages). "
              f"Steps under memory pressure: {s.get('pressure_steps')}; preemptions (vLLM /metrics): "
              f"{s.get('preemptions')}. "
              f"Compactions that needed a fallback or were undone: {s['failures']}; plans undone (the request "
              f"kept its pages and went on uncompacted): {s.get('rollbacks')}. "
              f"Invalid requests sent: {s['invalid_sent']} "
              f"(accepted: {s['invalid_accepted']}; rejections naming the offending key in error.param: "
              f"{s['rejections_naming_the_key']} of {s['invalid_with_a_key']}). Answers whose usage.kv_compaction shows a compaction: "
              f"{s['answers_compacted']} of {s['answers_with_kv_usage']} that carry it.", "",
              *_log_line(result.get("server")),
              "Targets: " + ", ".join(f"{k}: **{'PASS' if v else 'FAIL'}**" for k, v in s["targets"].items()), "",
              "| endpoint | mode | overrides | completed | rejected | disconnected | lost | other |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for row in result["breakdown"]:
        other = {k: v for k, v in row.items()
                 if k not in ("endpoint", "mode", "overrides", OK, REJECTED, DISCONNECTED, "lost") and v}
        lines.append(f"| {row['endpoint']} | {row['mode']} | {row['overrides']} | {row.get(OK, 0)} | "
                     f"{row.get(REJECTED, 0)} | {row.get(DISCONNECTED, 0)} | {row.get('lost', 0)} | "
                     f"{', '.join(f'{k} {v}' for k, v in other.items()) or ''} |")
    if result["problems"]:
        lines += ["", "Requests that should have been answered and were not (first 20):", ""]
        lines += [f"- #{p['index']} {p['endpoint']} {p['mode']} {p['overrides']}: {p['outcome']} (HTTP {p['status']}) "
                  f"{p['detail']}" for p in result["problems"][:20]]
    return "\n".join(lines) + "\n"


def _log_line(server: dict | None) -> list[str]:
    counts = (server or {}).get("log_counts")
    if not counts:
        return []
    return [f"Server log until it was stopped: {counts['tracebacks']} tracebacks ({counts['faults_raised']} "
            f"injected raises, {counts['non_finite_results']} non-finite results (the injected NaN), "
            f"{counts['fallbacks_logged']} solves falling back to another method, "
            f"{counts['all_methods_failed']} batches where every method failed, "
            f"{counts['left_uncompacted']} plans left uncompacted and "
            f"{counts['kept_newest_keys']} kept their newest keys under memory pressure), "
            f"{counts['engine_dead']} EngineDeadError, {counts['http_500_lines']} HTTP 500.", ""]


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}% of compactions"
