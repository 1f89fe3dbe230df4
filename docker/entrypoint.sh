#!/bin/sh
# Container entrypoint: the arguments of `docker run IMAGE ...` go to `vllm-compact serve` unchanged, so
# `docker run IMAGE MODEL --kv-compaction --kv-compaction-ratio 8 --max-model-len 8192` works like the CLI.
# A first argument naming another vllm-compact command runs that instead (`docker run IMAGE models list`).
set -e

if [ "$#" -eq 0 ]; then
    set -- smollm2-135m --kv-compaction
fi

case "$1" in
    serve | models | data | bench | --version | -V)
        exec vllm-compact "$@"
        ;;
    *)
        exec vllm-compact serve "$@"
        ;;
esac
