"""The vLLM glue: subclasses of vLLM's scheduler, worker and CPU attention backend, and the code that installs them.
With `server/`, the only code that imports vLLM; it calls `vllm_compact.core` for everything else."""
