"""Tokenizer throughput: tokenize and detokenize images/s, batched (the library's path) vs one image at a
time, for the `tiny` and `d12_d12` presets at 256x256 (random weights: speed does not depend on them).

    .venv/bin/python bench/tokenizer.py                       # CPU, float32
    .venv/bin/python bench/tokenizer.py --device cuda --bf16  # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from flextok import FlexTok, preset
from flextok.config import tiny


def build(name: str, device: str) -> FlexTok:
    cfg = tiny(image_size=256, num_registers=256) if name == "tiny" else preset(name)
    return FlexTok(cfg).to(device).eval()


def images_per_second(fn: Callable[[], None], num_images: int, device: str, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return num_images / best


def bench_model(name: str, args: argparse.Namespace) -> list[tuple[str, str, float, float]]:
    model = build(name, args.device)
    B = args.batch_size
    images = torch.rand(B, 3, 256, 256, device=args.device) * 2 - 1
    tokens = model.tokenize(images)
    k = min(args.k, model.num_registers)
    noise = model.draw_noise(B, torch.Generator(args.device).manual_seed(0))
    kw = dict(timesteps=args.timesteps, guidance_scale=args.guidance, apg=True)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)

    def tok_batched():
        with autocast:
            model.tokenize(images)

    def tok_single():
        with autocast:
            for b in range(B):
                model.tokenize(images[b : b + 1])

    def detok_batched():
        with autocast:
            model.detokenize(tokens[:, :k], noise=noise, **kw)

    def detok_single():
        with autocast:
            for b in range(B):
                model.detokenize(tokens[b : b + 1, :k], noise=noise[b : b + 1], **kw)

    rows = []
    for op, batched, single in [("tokenize", tok_batched, tok_single), ("detokenize", detok_batched, detok_single)]:
        fast = images_per_second(batched, B, args.device, args.repeats)
        slow = images_per_second(single, B, args.device, args.repeats)
        rows.append((name, op, fast, slow))
        print(f"  {name:8s} {op:10s} batched {fast:8.2f} img/s  one-at-a-time {slow:8.2f} img/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,d12_d12")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timesteps", type=int, default=4, help="decoder steps (the release uses 20-25)")
    parser.add_argument("--guidance", type=float, default=7.5, help="with APG: two decoder passes per step")
    parser.add_argument("--k", type=int, default=256, help="tokens kept for detokenize")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"device={args.device} bf16={args.bf16} batch={args.batch_size} timesteps={args.timesteps} "
        f"guidance={args.guidance} (APG) k={args.k} threads={torch.get_num_threads()}"
    )
    rows = [row for name in args.presets.split(",") for row in bench_model(name, args)]
    print("\n| model | op | batched img/s | one-at-a-time img/s | batched / single |")
    print("|---|---|---:|---:|---:|")
    for name, op, fast, slow in rows:
        print(f"| {name} | {op} | {fast:.2f} | {slow:.2f} | {fast / slow:.2f}x |")


if __name__ == "__main__":
    main()
