"""Copy a training checkpoint's EMA weights into the repo as a shipped model, in float16 (half the bytes).

    python models/ship.py runs/tokenizer-small/checkpoint_00005000 models/flextok-small
    python models/ship.py runs/ar-small/checkpoint_00000800 models/flextok-small-ar

Writes DEST/config.json (as the checkpoint's) and DEST/model.safetensors (every float tensor rounded to
float16; both FlexTok.from_pretrained and ARModel.from_pretrained load it into float32 modules), plus the run's
metrics.jsonl beside it, and prints the largest rounding change.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder with ema/ (written by the training jobs)")
    p.add_argument("dest", type=Path, help="the shipped model folder")
    args = p.parse_args()

    src = args.checkpoint / "ema"
    tensors = load_file(str(src / "model.safetensors"))
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    change = max((half[k].float() - v.float()).abs().max().item() for k, v in tensors.items() if v.numel())
    args.dest.mkdir(parents=True, exist_ok=True)
    save_file(half, str(args.dest / "model.safetensors"), metadata=metadata)
    shutil.copyfile(src / "config.json", args.dest / "config.json")
    metrics = args.checkpoint.parent / "tensorboard" / "metrics.jsonl"
    if metrics.is_file():
        shutil.copyfile(metrics, args.dest / "metrics.jsonl")
    size = (args.dest / "model.safetensors").stat().st_size
    print(f"{args.dest}: {len(half)} tensors, {size / 2**20:.1f} MiB; largest float16 rounding change {change:.2e}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
