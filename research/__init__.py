"""Research scripts behind the served defaults: offline replicas and engine diagnostics of needle answers.

Not part of the vllm-compact package (not installed, not in `vllm-compact bench`); run from the repository root:
`python -m research.<script> --help`. See research/README.md.
"""
