#!/usr/bin/env bash
# Prepare, on this machine, what bench/gpu.sh needs on the GPU machine that only a carried folder can bring
# (that machine has no network and only the working tree plus `carry` paths travel, 64 MiB in all):
#
#   .whl/                       wheels of the pure-Python packages it lacks: diffusers (the d12_d12/d18_d28 VAE)
#                               and torch-fidelity (pipeline.inception), Python 3.12, pinned as in pyproject.toml
#   .cache/inception-fp16/      the converted Inception weights stored as float16 (48 MB): the float32 file
#                               (96 MB) is over the limit; they load back into the float32 network
#
#   bash bench/gpu_wheels.sh    # in the repository root; needs .venv (make env) and the converted weights
#
# Then call the device with carry [".whl", ".cache/inception-fp16"] and `bash bench/gpu.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

mkdir -p .whl
git check-ignore -q .whl/x.whl || { echo ".whl/ is not git-ignored: add /.whl/ to .gitignore first" >&2; exit 1; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl diffusers==0.42.1 torch-fidelity==0.4.0

"$PY" - <<'EOF'
import os
from pathlib import Path

import torch

from pipeline.inception import CONVERTED_FILE, default_cache_dir, ensure_inception_weights

source = ensure_inception_weights()  # the cache's float32 file (converted on first use)
state = torch.load(source, map_location="cpu", weights_only=True)
half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
out = Path(".cache/inception-fp16") / CONVERTED_FILE.replace(".pth", "-fp16.pth")
out.parent.mkdir(parents=True, exist_ok=True)
torch.save(half, out)
print(f"{source} -> {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
EOF
du -sh .whl .cache/inception-fp16
