#!/usr/bin/env bash
# One GPU check for flextok-pipeline (bench/gpu.py says what each row measures and how).
#
#   bash bench/gpu.sh               # one GPU: under 7 minutes (rows stop at --budget 330 s, hard stop at 400 s)
#   bash bench/gpu.sh --dry-run     # any machine, seconds: this script parses, pip's install would, every row's
#                                   #   imports exist and its plan is valid
#   bash bench/gpu.sh --cpu-smoke   # the CPU: every row end to end at tiny sizes
#
# Wheels in .whl/ (bench/gpu_wheels.sh puts them there; the device call carries the folder) are installed into
# $GPU_BENCH_SITE first, for packages the GPU machine lacks (diffusers, torch-fidelity). $PYTHON: the interpreter
# (default python3). Extra arguments go to bench/gpu.py (e.g. --only matmul,ar_train --budget 200).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_BENCH_SITE:-/tmp/flextok-gpubench-site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

wheels=(.whl/*.whl)
[[ -e ${wheels[0]} ]] || wheels=()
install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")

if [[ " $* " == *" --dry-run "* ]]; then
    bash -n "$0" && echo "[dry-run] bench/gpu.sh parses"
    if ((${#wheels[@]})); then
        "${install[@]}" --dry-run "${wheels[@]}" && echo "[dry-run] pip would install: ${wheels[*]}" || exit 1
    else
        echo "[dry-run] no wheels in .whl/: the install step is skipped"
    fi
    exec "$PY" bench/gpu.py "$@"
fi

if ((${#wheels[@]})); then
    echo "[gpu.sh] installing ${wheels[*]} into $SITE"
    if "${install[@]}" "${wheels[@]}"; then
        export PYTHONPATH="$SITE:$PYTHONPATH"
    else
        echo "[gpu.sh] wheel install FAILED; rows that need them will say so"
    fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit \
    --format=csv,noheader
# a hard stop after the rows' budget (gpu.py prints its table on SIGTERM); none for the CPU smoke run
limit=${GPU_BENCH_HARD_LIMIT:-400}
[[ " $* " == *" --cpu-smoke "* ]] && limit=${GPU_BENCH_HARD_LIMIT:-0}
exec timeout -k 15 "$limit" "$PY" bench/gpu.py "$@"
