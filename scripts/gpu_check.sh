#!/usr/bin/env bash
# One-command GPU check: the test suite on CUDA, training img/s (fp32 / bf16-mixed / + channels_last / + compile)
# and sampling img/s of ours vs diffusers' KarrasVePipeline, as JSON + markdown in OUT (see scripts/gpu_check.py).
#   bash scripts/gpu_check.sh [OUT] [--smoke]        # OUT defaults to gpu_check/; PYTHON picks the interpreter
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
