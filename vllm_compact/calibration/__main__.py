"""`python -m vllm_compact.calibration`: the same as `vllm-compact calibrate`."""

import sys

from vllm_compact.calibration.cli import main

sys.exit(main())
