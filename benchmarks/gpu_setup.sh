#!/usr/bin/env bash
# Prepare a GPU machine that has torch but no network for benchmarks/bench_gpu.py: install the
# segment-anything wheel from wheels/ (git-ignored; carry it with the working tree). scrollsam
# itself is not installed: bench_gpu.py and run.py (through common.py) put src/ on their path
# when scrollsam is not importable.
#
# Get the wheel once, on a machine with network, from the repository root:
#   .venv/bin/pip download --no-deps -d wheels segment-anything==1.0
# Then on the GPU machine, from the repository root:
#   bash benchmarks/gpu_setup.sh && python3 benchmarks/bench_gpu.py --out "$OUT/gpu.json"
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if "$PY" -c "import segment_anything" 2>/dev/null; then
    echo "segment_anything already importable"
else
    shopt -s nullglob
    wheels=(wheels/segment_anything-*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "error: no wheels/segment_anything-*.whl; download it first (see this script)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        "${wheels[@]}"
fi
"$PY" -c "import torch, segment_anything; print('torch', torch.__version__, '| cuda',
torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available()
else 'no GPU')"
