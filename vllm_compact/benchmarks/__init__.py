"""Benchmarks behind `vllm-compact bench ...` (attention-matching quality/speed on captured tensors)."""
