"""`vllm-compact bench reliability`: many requests, bad ones and faults included, against a LIVE compacting server.

Drives a running `vllm-compact serve ... --kv-compaction` over HTTP (`--base-url`), or starts one itself
(`--start-server`: its own process group, the test-only fault switch VLLM_COMPACT_FAULTS in its environment,
stopped by signalling the group at the end). Every request is drawn at random (seeded):

- /v1/completions or /v1/chat/completions, streaming (sometimes with include_usage) or not;
- a prompt of --min-prompt..--max-prompt tokens of essay text (most cross the server's compaction trigger), a
  max_tokens of --min-tokens..--max-tokens, sometimes a stop string or ignore_eos;
- no per-request compaction keys, valid ones (`vllm_xargs.kv_compaction_ratio|method|enabled`, from what
  GET /v1/compaction/config allows), or invalid ones (wrong types, NaN/inf, looser or out-of-range ratios,
  unknown methods or keys, a non-object vllm_xargs), which must get an HTTP 4xx and never reach the engine;
- a deliberate client disconnect: a stream closed after a few chunks, a non-streaming request abandoned after a
  random delay.

Counted: `completed` (a complete answer: finish_reason set, and max_tokens tokens when it is "length"),
`rejected_4xx`, `errors_5xx` (HTTP 5xx, and error events inside a 200 stream), `lost` (a request that should have
been answered, was not deliberately disconnected and did not get a complete answer), `compactions`,
`faults_injected` and `failures` (worker counters from GET /v1/compaction/stats, end minus start), `leaked_pages`
(the KV pool's free pages at the end minus at the start, both read with the server idle), `server_alive` (/health
and one last completion answer at the end). Writes JSON + markdown (with this exact command) to --out.
"""
