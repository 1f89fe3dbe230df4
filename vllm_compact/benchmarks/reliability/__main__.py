"""`python -m vllm_compact.benchmarks.reliability`: the same as `vllm-compact bench reliability`."""

import sys

from vllm_compact.benchmarks.reliability.cli import main

sys.exit(main(sys.argv[1:]))
