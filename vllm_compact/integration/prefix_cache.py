"""vLLM's automatic prefix caching with compaction: what may and may not become a cached prefix block.

A block's KV depends on everything its tokens attended to. Blocks a request wrote before its first compaction hold
the same KV any request with the same tokens would compute, so they stay cached (and the source blocks a compaction
frees stay in vLLM's free queue as cached blocks: the next turn of a chat hits them). From a request's first
compaction plan on, the blocks it fills were computed over its compacted context: they are kept out of the cache
until the request releases its pages. Compact pages never enter the request's block list, so they are never hashed.
"""

from __future__ import annotations


class CompactionPrefixCacheGuard:
    """Stops vLLM from caching the blocks of requests with a compaction history (installed on the KV cache
    manager's coordinator, the one place vLLM commits blocks to the prefix cache)."""

    def __init__(self, kv_cache_manager) -> None:
        self.frozen: set[str] = set()
        coordinator = kv_cache_manager.coordinator
        commit = coordinator.cache_blocks

        def cache_blocks(request, num_computed_tokens: int) -> None:
            if request.request_id not in self.frozen:
                commit(request, num_computed_tokens)

        coordinator.cache_blocks = cache_blocks

    def freeze(self, req_id: str) -> None:
        """The request's first compaction is planned: nothing it fills from now on is a prefix block."""
        self.frozen.add(req_id)

    def release(self, req_id: str) -> None:
        """The request released its pages (finished, aborted, preempted: recomputed from its tokens)."""
        self.frozen.discard(req_id)
