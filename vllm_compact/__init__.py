"""vllm-compact: KV-cache compaction with Attention Matching for vLLM."""

__version__ = "0.1.0"
