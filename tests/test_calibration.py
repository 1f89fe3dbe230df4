"""`vllm-compact calibrate` and the per-head budget tables: the statistic against an independent float64
recomputation, the command on the tiny model, the shipped tables, and which table a served model gets."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_compact.calibration.allocation import (
    exchange_allocation,
    greedy_allocation,
    interpolated_error,
    proportions_from_curves,
    proportions_from_errors,
)
from vllm_compact.calibration.capture import grid_budgets
from vllm_compact.calibration.cli import main
from vllm_compact.calibration.objectives import coverage_curve, keys_needed
from vllm_compact.head_table import (
    TABLES_DIR,
    UNIFORM,
    check_table_shape,
    model_fingerprint,
    read_head_table,
    resolve_head_budgets,
    shipped_table_for,
)

# (layers, KV heads) of the shipped models, as their registry summaries state them
SHIPPED_SHAPES = {"smollm2-135m": (30, 3), "qwen2.5-0.5b": (24, 2)}

# SmolLM2-135M-Instruct's config.json shape fields, written out independently of the shipped table
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True,
}


# ---- the statistic --------------------------------------------------------------------------------------------------


def _reference_curve(reference: np.ndarray, heldout: np.ndarray, keys: np.ndarray, scale: float) -> np.ndarray:
    """Plain float64 loops: rank keys by RMS local attention of the reference queries, then the mean held-out
    local mass on the top-k keys for every k."""
    heads, span = keys.shape[0], keys.shape[1]
    out = np.zeros((heads, span))
    for h in range(heads):
        def probs(q):
            logits = np.array([scale * float(np.dot(q, keys[h, j])) for j in range(span)])
            e = np.exp(logits - logits.max())
            return e / e.sum()

        ref = np.stack([probs(q) for q in reference[h]])
        score = np.sqrt((ref ** 2).mean(axis=0))
        order = sorted(range(span), key=lambda j: -score[j])
        for q in heldout[h]:
            p = probs(q)
            running = 0.0
            for k, j in enumerate(order):
                running += p[j]
                out[h, k] += running
        out[h] /= len(heldout[h])
    return out


def _reference_keys_needed(curve: np.ndarray, share: float) -> list[int]:
    result = []
    for row in curve:
        k = next((i + 1 for i, c in enumerate(row) if c >= share), len(row))
        result.append(k)
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_statistic_matches_a_float64_recomputation(seed):
    g = torch.Generator().manual_seed(seed)
    heads, n_ref, n_ho, span, d = 3, 6, 9, 17, 8
    keys = torch.randn(heads, span, d, generator=g) * 1.5
    # heads with different sharpness: the last one has near-uniform attention
    sharp = torch.tensor([3.0, 1.0, 0.05]).view(heads, 1, 1)
    reference = torch.randn(heads, n_ref, d, generator=g) * sharp
    # held-out queries near the reference ones (the recent window predicts what comes next)
    heldout = reference[:, torch.arange(n_ho) % n_ref] + 0.05 * torch.randn(heads, n_ho, d, generator=g) * sharp
    scale = d ** -0.5
    curve = coverage_curve(reference, heldout, keys, scale)
    expected = _reference_curve(reference.double().numpy(), heldout.double().numpy(), keys.double().numpy(), scale)
    assert curve.dtype == torch.float64 and curve.shape == (heads, span)
    np.testing.assert_allclose(curve.numpy(), expected, rtol=0, atol=1e-12)
    assert np.allclose(expected[:, -1], 1.0)
    for share in (0.5, 0.8, 0.9, 0.95):
        got = keys_needed(curve, share).tolist()
        assert got == _reference_keys_needed(expected, share), share
    # the diffuse head needs more keys than the sharp one
    k90 = keys_needed(curve, 0.9).tolist()
    assert k90[2] > k90[0]


def test_keys_needed_on_a_hand_made_curve():
    curve = torch.tensor([[0.5, 0.89, 0.9, 1.0], [0.95, 0.97, 0.99, 1.0], [0.1, 0.2, 0.3, 1.0 - 1e-15]],
                         dtype=torch.float64)
    assert keys_needed(curve, 0.9).tolist() == [3, 1, 4]
    assert keys_needed(curve, 0.999999).tolist() == [4, 4, 4]


def _concave_curves(seed: int, heads: int, span: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gains = torch.rand(heads, span, generator=g, dtype=torch.float64) ** torch.tensor([[0.5], [3.0], [8.0]])[:heads]
    gains = gains.sort(dim=-1, descending=True).values
    return gains.cumsum(-1) / gains.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_allocation_is_the_brute_force_optimum_on_concave_curves(seed):
    heads, span = 3, 12
    curves = _concave_curves(seed, heads, span)
    rows = curves.tolist()
    for total, floor_units, cap in ((9, 1, 9), (12, 2, 8), (15, 3, 9), (6, 2, 9)):
        got = greedy_allocation(curves, total, floor_units, cap)
        assert sum(got) == total and all(floor_units <= b <= cap for b in got)
        best = max(sum(rows[h][b[h] - 1] for h in range(heads))
                   for b in itertools.product(range(floor_units, cap + 1), repeat=heads) if sum(b) == total)
        assert sum(rows[h][got[h] - 1] for h in range(heads)) == pytest.approx(best, abs=1e-12)


def test_greedy_gives_the_diffuse_head_more_and_keeps_the_floor():
    span = 100
    k = torch.arange(1, span + 1, dtype=torch.float64)
    sharp = 1 - torch.exp(-k / 3)  # saturated after ~10 keys
    diffuse = k / span  # linear: every key matters
    alloc = greedy_allocation(torch.stack([sharp, diffuse]), total=40, floor_units=5, cap=75)
    assert alloc[1] > alloc[0] >= 5 and sum(alloc) == 40


def test_proportions_scopes_sum_and_floor():
    curves = torch.stack([_concave_curves(s, 3, 40) for s in range(4)])  # [L=4, H=3, T=40]
    layer = proportions_from_curves(curves, [5.0, 10.0], floor=0.25, scope="layer")
    assert layer.shape == (4, 3)
    np.testing.assert_allclose(layer.sum(1).numpy(), 0.25, atol=1e-12)
    # at 10x uniform is 4 entries, the floor 1; at 5x 8 and 2: no head below the floors' average share
    assert float(layer.min()) >= ((1 / 12) + (2 / 24)) / 2 / 4 - 1e-12
    # one ratio, by hand: the allocation's share of the layer total
    one = proportions_from_curves(curves, [10.0], floor=0.25, scope="layer")
    alloc = greedy_allocation(curves[2], 12, 1, 30)
    np.testing.assert_allclose(one[2].numpy(), np.array(alloc) / 12 / 4, atol=1e-15)
    model = proportions_from_curves(curves, [10.0], floor=0.25, scope="model")
    np.testing.assert_allclose(model.flatten().numpy(),
                               np.array(greedy_allocation(curves.flatten(0, 1), 48, 1, 30)) / 48, atol=1e-15)
    with pytest.raises(ValueError):
        proportions_from_curves(curves, [10.0], 0.25, "global")


def test_interpolated_error_between_below_and_above_the_grid():
    budgets, errs = [10, 40, 160], [0.8, 0.4, 0.1]
    assert interpolated_error(errs, budgets, 40) == pytest.approx(0.4)
    assert interpolated_error(errs, budgets, 20) == pytest.approx(0.6)  # halfway in log budget
    assert interpolated_error(errs, budgets, 5) == pytest.approx(1.0)  # first segment's slope continues
    assert interpolated_error(errs, budgets, 1000) == pytest.approx(0.1)  # flat above the grid
    assert grid_budgets(1920, [2.5, 5, 10, 20, 40]) == [48, 96, 192, 384, 768]


def _convex_errors(seed: int, heads: int, budgets: list[int]) -> torch.Tensor:
    """Decreasing and convex in log budget: a * exp(-c * log b) per head."""
    g = torch.Generator().manual_seed(seed)
    a = 0.5 + torch.rand(heads, 1, generator=g, dtype=torch.float64)
    c = 0.1 + torch.rand(heads, 1, generator=g, dtype=torch.float64)
    return a * torch.tensor(budgets, dtype=torch.float64).log().mul(-c).exp()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exchange_reaches_the_lattice_optimum_on_convex_error_curves(seed):
    budgets = [8, 16, 32, 64, 128]
    errors = _convex_errors(seed, 3, budgets)
    rows = errors.tolist()
    uniform, step, floor_units, cap = 32, 4, 8, 96
    got = exchange_allocation(errors, budgets, uniform, floor_units, cap, step=step)
    assert sum(got) == 3 * uniform and all(floor_units <= b <= cap for b in got)

    def total(alloc):
        return sum(interpolated_error(rows[h], budgets, b) for h, b in enumerate(alloc))

    lattice = range(uniform % step or step, cap + 1, step)
    best = min(total(b) for b in itertools.product(lattice, repeat=3)
               if sum(b) == 3 * uniform and min(b) >= floor_units)
    assert total(got) == pytest.approx(best, abs=1e-12)
    assert total(got) <= total([uniform] * 3)


def test_exchange_moves_budget_to_the_head_that_gains_and_never_below_the_floor():
    budgets = [10, 20, 40, 80]
    flat = [0.30, 0.30, 0.30, 0.30]  # compaction does not hurt it: the donor
    steep = [0.90, 0.50, 0.25, 0.10]
    alloc = exchange_allocation(torch.tensor([flat, steep]), budgets, uniform=40, floor_units=10, cap=60, step=5)
    assert alloc == [20, 60]  # the steep head reaches its cap; the flat one gives what it must
    alloc = exchange_allocation(torch.tensor([flat, steep]), budgets, uniform=40, floor_units=30, cap=200, step=5)
    assert alloc[0] == 30
    # nothing to gain: uniform stays
    assert exchange_allocation(torch.tensor([flat, flat]), budgets, 40, 10, 60) == [40, 40]


def test_error_proportions_layer_scope_rows_and_ratios():
    budgets = [8, 16, 32, 64, 128]
    errors = torch.stack([_convex_errors(s, 3, budgets) for s in range(4)])  # [L=4, H=3, B]
    layer = proportions_from_errors(errors, budgets, span=256, ratios=[4.0, 8.0], floor=0.25, scope="layer")
    np.testing.assert_allclose(layer.sum(1).numpy(), 0.25, atol=1e-12)
    one = proportions_from_errors(errors, budgets, span=256, ratios=[8.0], floor=0.25, scope="layer")
    alloc = exchange_allocation(errors[1], budgets, 32, 8, 192)
    np.testing.assert_allclose(one[1].numpy(), np.array(alloc) / 96 / 4, atol=1e-15)
    model = proportions_from_errors(errors, budgets, span=256, ratios=[8.0], floor=0.25, scope="model")
    assert float(model.sum()) == pytest.approx(1.0)


# ---- the command -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path() -> str:
    from vllm_compact.models.registry import ensure_model

    return str(ensure_model("tiny"))


SMALL = ["--contexts", "2", "--span", "320", "--protected", "16", "--recent", "32", "--window", "32",
         "--block-size", "16", "--no-progress"]


def test_calibrate_tiny_writes_a_valid_table(tiny_path, tmp_path):
    out = tmp_path / "tiny.json"
    assert main(["tiny", "--out", str(out), *SMALL]) == 0
    table = read_head_table(out)  # the engine's own reader: valid JSON, numbers >= 0, positive sum
    check_table_shape(out, table, 4, 2)
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and data["scope"] == "layer" and data["method"] == "output-error-exchange"
    assert data["fingerprint"] == model_fingerprint(json.loads((Path(tiny_path) / "config.json").read_text()))
    assert np.allclose([sum(row) for row in table], 0.25, atol=1e-6)
    assert all(v > 0 for row in table for v in row)
    counts = np.array(data["keys_needed"])
    assert counts.shape == (4, 2) and (counts >= 1).all() and (counts <= 320 - 16).all()
    assert np.array(data["output_error"]).shape == (4, 2, len(data["grid_budgets"])) == (4, 2, 5)
    assert set(data["mean_error"]) == {"5", "10", "20"}
    mem = data["memory"]
    assert mem["calibrated"]["pages"] == mem["uniform"]["pages"]
    assert mem["calibrated"]["layer_totals"] == mem["uniform"]["layer_totals"]
    # by folder too, and the model scope
    out2 = tmp_path / "tiny-model.json"
    assert main([tiny_path, "--out", str(out2), "--scope", "model", "--objective", "coverage", *SMALL]) == 0
    assert np.isclose(sum(map(sum, read_head_table(out2))), 1.0, atol=1e-6)
    assert json.loads(out2.read_text())["method"] == "coverage-greedy"


def test_evaluate_compares_uniform_with_a_table_on_held_out_text(tiny_path, tmp_path, capsys):
    table = tmp_path / "tiny.json"
    assert main(["tiny", "--out", str(table), "--objective", "coverage", *SMALL]) == 0
    out = tmp_path / "evaluation.json"
    assert main(["tiny", "--evaluate", str(table), "--out", str(out), "--ratios", "5", "10", *SMALL]) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("vllm-compact calibrate tiny --evaluate ")
    assert [(r["ratio"], r["head_budgets"]) for r in data["rows"]] == [
        (5.0, "uniform"), (5.0, "table"), (10.0, "uniform"), (10.0, "table")]
    assert all(r["contexts"] == 2 and 0 <= r["kept_mass_mean"] <= 1 for r in data["rows"])
    assert str(tmp_path) not in out.read_text()  # no machine path: $TMPDIR-relative at most
    assert data["command"] in out.with_suffix(".md").read_text()
    # no table ships for tiny: --evaluate without a file is refused
    assert main(["tiny", "--evaluate", *SMALL]) == 2
    assert "no head-budget table ships for tiny" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["tiny", "--share", "1.5"], ["tiny", "--share", "0"], ["tiny", "--contexts", "0"], ["tiny", "--floor", "-1"],
    ["tiny", "--scope", "all"], ["tiny", "--span", "abc"], ["tiny", "--span", "100", "--protected", "100"],
    ["tiny", "--text", "/no/such/file"], ["tiny", "--method", "bogus"], ["tiny", "--objective", "x"],
    ["tiny", "--grid", "0.5"], [],
])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_unknown_model_exits_2(capsys):
    assert main(["no-such-model", "--no-progress"]) == 2
    assert "neither a model folder nor one of" in capsys.readouterr().err


def test_help_through_the_console_command():
    proc = subprocess.run([sys.executable, "-m", "vllm_compact.server.cli", "calibrate", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "keys_needed" in proc.stdout and "--share" in proc.stdout and "--scope" in proc.stdout
    top = subprocess.run([sys.executable, "-m", "vllm_compact.server.cli", "--help"], capture_output=True, text=True)
    assert "calibrate" in top.stdout


# ---- the shipped tables ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED_SHAPES))
def test_shipped_tables_exist_and_match_their_models_shape(name):
    path = TABLES_DIR / f"{name}.json"
    assert path.is_file()
    table = read_head_table(path)
    check_table_shape(path, table, *SHIPPED_SHAPES[name])
    data = json.loads(path.read_text())
    layers, heads = SHIPPED_SHAPES[name]
    assert data["fingerprint"]["num_hidden_layers"] == layers and data["fingerprint"]["num_key_value_heads"] == heads
    # layer-scoped: every layer keeps the uniform share, so pages equal uniform's
    assert np.allclose([sum(row) for row in table], 1 / layers, rtol=1e-5)
    assert min(min(row) for row in table) > 0
    from vllm_compact.models.registry import is_fetched, model_path

    if is_fetched(name):  # the fingerprint is the converted model's own config
        config = json.loads((model_path(name) / "config.json").read_text())
        assert data["fingerprint"] == model_fingerprint(config)


def test_the_shipped_table_keeps_uniform_pages_at_ratio_10():
    from vllm_compact.core.budgets import HeadBudgetPolicy

    path = str(TABLES_DIR / "smollm2-135m.json")
    calibrated = HeadBudgetPolicy(30, 3, 10.0, table_path=path)
    uniform = HeadBudgetPolicy(30, 3, 10.0)
    assert calibrated.per_layer and calibrated.table is not None
    for span in (1024, 1920, 3840, 4096):
        cal, uni = calibrated.budgets(span, span, None), uniform.budgets(span, span, None)
        assert [sum(r) for r in cal] == [sum(r) for r in uni]
        assert len({v for row in cal for v in row}) > 1  # really nonuniform
        for block in (16, 128):
            assert calibrated.pages_needed(cal, block) == uniform.pages_needed(uni, block)


# ---- which table a served model gets ---------------------------------------------------------------------------------


def test_default_table_by_name_by_config_and_overrides(tmp_path):
    shipped = str(TABLES_DIR / "smollm2-135m.json")
    path, how = resolve_head_budgets(None, "smollm2-135m")
    assert path == shipped and "shipped for smollm2-135m" in how
    # a folder (or vLLM's hf_config) with SmolLM2's shape, under any name
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    assert resolve_head_budgets(None, str(folder))[0] == shipped
    assert resolve_head_budgets(None, "/elsewhere", SMOLLM2_CONFIG)[0] == shipped
    assert shipped_table_for(None, {**SMOLLM2_CONFIG, "num_hidden_layers": 31}) is None
    # an explicit file wins, 'uniform' forces uniform, other models stay uniform
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"proportions": [[1, 2, 3]] * 30}))
    assert resolve_head_budgets(str(own), "smollm2-135m")[0] == str(own)
    path, how = resolve_head_budgets(UNIFORM, "smollm2-135m")
    assert path is None and "forced" in how
    assert resolve_head_budgets(None, "tiny")[0] is None


def test_serve_writes_the_default_into_the_config(tmp_path):
    from vllm_compact.config import CompactionConfig
    from vllm_compact.core.budgets import HeadBudgetPolicy
    from vllm_compact.server.serve import with_default_head_budgets

    shipped = str(TABLES_DIR / "smollm2-135m.json")
    on = CompactionConfig(enabled=True)
    assert with_default_head_budgets(on, "smollm2-135m", None).head_budget_file == shipped
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"proportions": [[1, 2, 3]] * 30}))
    explicit = CompactionConfig(enabled=True, head_budget_file=str(own))
    assert with_default_head_budgets(explicit, "smollm2-135m", None).head_budget_file == str(own)
    forced = with_default_head_budgets(CompactionConfig(enabled=True, head_budget_file=UNIFORM), "smollm2-135m", None)
    assert forced.head_budget_file == UNIFORM
    assert HeadBudgetPolicy(30, 3, 10.0, table_path=forced.head_budget_file).table is None
    assert with_default_head_budgets(on, "tiny", None).head_budget_file is None


def test_uniform_flag_is_accepted_before_vllm_is_imported(tiny_path):
    code = (
        "import sys, json\n"
        "from vllm_compact.server.flags import check_compaction_argv, check_head_budgets, local_model_dir\n"
        f"argv = [{tiny_path!r}, '--kv-compaction', '--kv-compaction-head-budgets', 'uniform']\n"
        "c = check_compaction_argv(argv)\n"
        "check_head_budgets(c, local_model_dir(argv[0]), argv)\n"
        "print(json.dumps([c.head_budget_file, any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["uniform", False]


def test_config_endpoint_text_names_the_table():
    from vllm_compact.head_table import describe_head_budgets

    assert "shipped for qwen2.5-0.5b" in describe_head_budgets(str(TABLES_DIR / "qwen2.5-0.5b.json"))
    assert describe_head_budgets(UNIFORM).startswith("uniform")
    assert describe_head_budgets(None).startswith("uniform")
    assert "'/x/own.json'" in describe_head_budgets("/x/own.json")


def test_the_engine_scheduler_resolves_an_unset_file_from_the_model_config(tmp_path):
    """The offline LLM path: serve did not resolve anything, the scheduler does it from vLLM's model config."""
    from types import SimpleNamespace

    from vllm_compact.config import CompactionConfig
    from vllm_compact.integration.scheduler import CompactionScheduler

    folder = tmp_path / "model"
    folder.mkdir()
    fake = SimpleNamespace(compaction_config=CompactionConfig(enabled=True))
    hf = SimpleNamespace(to_dict=lambda: dict(SMOLLM2_CONFIG))
    CompactionScheduler._resolve_head_budgets(fake, SimpleNamespace(model=str(folder), hf_config=hf))
    assert fake.compaction_config.head_budget_file == str(TABLES_DIR / "smollm2-135m.json")
    forced = SimpleNamespace(compaction_config=CompactionConfig(enabled=True, head_budget_file=UNIFORM))
    CompactionScheduler._resolve_head_budgets(forced, SimpleNamespace(model=str(folder), hf_config=hf))
    assert forced.compaction_config.head_budget_file == UNIFORM


# ---- facts planted in the span, unrotated keys ----------------------------------------------------------------------


def test_fact_contexts_state_every_fact_inside_the_span_and_ask_it_after(tiny_path):
    from transformers import AutoTokenizer

    from vllm_compact.calibration.facts import fact_context
    from vllm_compact.data.essays import essay_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    essay = tokenizer(essay_text()[:20000], add_special_tokens=False)["input_ids"]
    protected, span, recent = 16, 600, 64
    context = fact_context(tokenizer, essay, protected, span, recent, count=4, seed=7)
    assert len(context.ids) == span + recent + context.window
    window = tokenizer.decode(context.ids[-context.window:])
    assert window.count("Q: What is the ") == 4
    for position in context.fact_positions:
        stated = tokenizer.decode(context.ids[position:span])
        assert stated.startswith(" For the record, the ")
        value = stated.split(" is ", 1)[1].split(".", 1)[0]
        assert value.isdigit() and 5 <= len(value) <= 8
        assert f"is {value}." in window  # the answer states the planted value
        assert protected <= position and position + 24 < span
    # the essay runs on without a seam from the span's end through the recent window
    recent_ids = context.ids[span - 8 : span + recent]
    assert any(essay[i : i + len(recent_ids)] == recent_ids for i in range(len(essay) - len(recent_ids)))
    with pytest.raises(ValueError, match="no room"):
        fact_context(tokenizer, essay, protected, protected + 40, recent, count=4, seed=7)


def test_calibration_keeps_the_span_keys_as_they_were_before_rope(tiny_path):
    """The error objective compacts with the engine's content keys: the recorder's unrotated keys must be the
    layer's key projection itself (captured by a hook, before the model rotates it)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vllm_compact.benchmarks.capture import config_rotary, load_model
    from vllm_compact.calibration.capture import Layout, _CoverageRecorder

    model, _ = load_model(Path(tiny_path))
    layout = Layout(protected=8, span=96, recent=16, window=16)
    recorder = _CoverageRecorder(layout, keep=True, rotary=config_rotary(model.config, layout.tokens))
    ALL_ATTENTION_FUNCTIONS.register("calibration_test", recorder)
    ALL_MASK_ATTENTION_FUNCTIONS.register("calibration_test", sdpa_mask)
    projected = {}
    attention = model.model.layers[1].self_attn
    hook = attention.k_proj.register_forward_hook(lambda module, args, out: projected.setdefault("keys", out))
    ids = torch.randint(0, model.config.vocab_size, (1, layout.tokens), generator=torch.Generator().manual_seed(0))
    try:
        model.set_attn_implementation("calibration_test")
        with torch.no_grad():
            model(input_ids=ids, position_ids=torch.arange(layout.tokens)[None], use_cache=False)
    finally:
        hook.remove()
        model.set_attn_implementation("sdpa")
    heads, dim = model.config.num_key_value_heads, attention.head_dim
    before_rope = projected["keys"][0].view(layout.tokens, heads, dim).transpose(0, 1)[:, layout.protected:layout.span]
    span_keys, content = recorder.kept[1][0], recorder.kept[1][4]
    assert not torch.allclose(span_keys, before_rope, atol=1e-3)  # the stored keys are rotated
    assert torch.allclose(content, before_rope, atol=1e-4)


def test_calibrate_on_planted_facts_writes_a_valid_table(tiny_path, tmp_path):
    out = tmp_path / "tiny-facts.json"
    assert main(["tiny", "--out", str(out), "--facts", "2", *SMALL]) == 0
    table = read_head_table(out)
    check_table_shape(out, table, 4, 2)
    data = json.loads(out.read_text())
    assert data["settings"]["facts"] == 2
    assert np.allclose([sum(row) for row in table], 0.25, atol=1e-6)
    assert np.isfinite(np.array(data["output_error"])).all()
