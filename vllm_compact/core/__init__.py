"""The engine-independent part of compaction: plans, per-request state, the compact-page layout, the worker-side
compactor and the stats payload. Nothing here imports vLLM (tests/test_boundary.py checks it)."""
