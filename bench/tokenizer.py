"""Tokenizer throughput: tokenize and detokenize images/s, batched (the library's path) vs one image at a
time, for the `tiny` and `d12_d12` presets at 256x256 (random weights: speed does not depend on them).

    .venv/bin/python bench/tokenizer.py                       # CPU, float32
    .venv/bin/python bench/tokenizer.py --device cuda --bf16  # GPU, bf16 autocast
    .venv/bin/python bench/tokenizer.py --malloc-compare 3    # glibc malloc: default vs pipeline.malloc
    .venv/bin/python bench/tokenizer.py --presets d12_d12 --batch-size 4 --malloc-compare 2 \
        --official-src /path/to/ml-flextok:/path/to/its-deps  # and the release's code, same weights

--malloc-compare N: the same saved weights and inputs, tokenized and detokenized (batch --batch-size) in
fresh child processes, N with glibc's default malloc and N with pipeline.malloc's MALLOC_* variables (set at
the child's start, as Ray's workers get them), alternating so that load on the machine hits both alike.
Each child reports the best of --repeats timed calls after a warm-up, its minor page faults during the timed
calls, and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flextok import FlexTok, preset  # noqa: E402
from flextok.config import tiny  # noqa: E402
from pipeline.malloc import ENV_VARS  # noqa: E402


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


def timed_child(model_dir: str, args: argparse.Namespace) -> dict:
    """In a child process: best tokenize/detokenize seconds, minor page faults while timed, peak RSS."""
    torch.manual_seed(0)
    model = FlexTok.from_pretrained(model_dir).eval()
    images = torch.rand(args.batch_size, 3, 256, 256) * 2 - 1
    noise = model.draw_noise(args.batch_size, torch.Generator().manual_seed(0))
    out: dict = {}
    with torch.no_grad():
        tokens = model.tokenize(images)
        k = min(args.k, model.num_registers)
        calls = {
            "tokenize": lambda: model.tokenize(images),
            "detokenize": lambda: model.detokenize(
                tokens[:, :k], timesteps=args.timesteps, guidance_scale=args.guidance, apg=True, noise=noise
            ),
        }
        for op, fn in calls.items():
            fn()  # warm-up
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            out[op] = best
            out[op + "_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.repeats
    out["tokens_sha"] = hash(tuple(tokens.flatten().tolist()))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


MODES = ("ours, default", "ours, tuned", "official, default", "official, tuned")


def malloc_compare(args: argparse.Namespace) -> None:
    """Alternate child processes with and without pipeline.malloc's variables on the same weights; with
    --official-src also the release's code (bench/official_child.py) on the same weights, exported to its layout."""
    name = args.presets.split(",")[-1]
    base_env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    modes = MODES if args.official_src else MODES[:2]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build(name, "cpu")
        model.save_pretrained(Path(tmp) / "ours")
        if args.official_src:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from official_export import save_official  # the exporter lives with the tests only

            save_official(model, Path(tmp) / "official")
        settings = [str(args.batch_size), str(args.timesteps), str(args.guidance), str(args.k), str(args.repeats)]
        ours = [sys.executable, __file__, "--child", str(Path(tmp) / "ours"), "--batch-size", settings[0]]
        ours += ["--timesteps", settings[1], "--guidance", settings[2], "--k", settings[3], "--repeats", settings[4]]
        official = [sys.executable, str(Path(__file__).with_name("official_child.py")), str(Path(tmp) / "official")]
        official += settings
        for i in range(args.malloc_compare):
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:  # rotate the order each round
                env = base_env | (ENV_VARS if mode.endswith("tuned") else {})
                if mode.startswith("official"):
                    env["PYTHONPATH"] = args.official_src
                cmd = official if mode.startswith("official") else ours
                line = subprocess.run(cmd, env=env, cwd=tmp, check=True, capture_output=True, text=True).stdout
                results[mode].append(json.loads(line.strip().splitlines()[-1]))
                r = results[mode][-1]
                print(f"  {mode:18s} tokenize {r['tokenize']:.3f} s  detokenize {r['detokenize']:.3f} s", flush=True)
    report(name, args, results)


def report(name: str, args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    modes = list(results)
    same = {r["tokens_sha"] for rs in results.values() for r in rs}
    n = len(results[modes[0]])
    print(f"\n{name}, batch {args.batch_size}, {args.timesteps} steps, APG, k={args.k}, {n} children each")
    print(f"load average before/after: {args.load0} / {os.getloadavg()}; same tokens in all children: {len(same) == 1}")
    print("| | " + " | ".join(modes) + " |")
    print("|---|" + "---:|" * len(modes))
    med = {(m, key): median(r[key] for r in results[m]) for m in modes for key in results[m][0] if key != "code"}

    def row(label: str, key: str, fmt: str) -> None:
        print(f"| {label} | " + " | ".join(format(med[m, key], fmt) for m in modes) + " |")

    for op in ("tokenize", "detokenize"):
        row(f"{op} s (best of {args.repeats}, median of children)", op, ".3f")
        row(f"{op} minor page faults per call", op + "_faults", ".0f")
    row("peak RSS MiB", "peak_rss_mib", ".0f")
    print()

    def speed(op: str, fast: str, slow: str) -> str:  # how many times faster `fast` is than `slow`
        return f"{fast} / {slow} {med[slow, op] / med[fast, op]:.2f}x"

    for op in ("tokenize", "detokenize"):
        ratios = [speed(op, "ours, tuned", "ours, default")]
        if "official, default" in modes:
            ratios += [speed(op, "ours, tuned", "official, default"), speed(op, "ours, default", "official, default")]
            ratios += [speed(op, "ours, tuned", "official, tuned")]
        print(f"{op} speed: " + "; ".join(ratios))


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
    parser.add_argument("--malloc-compare", type=int, default=0, help="N child processes per malloc setting")
    parser.add_argument(
        "--official-src", help="with --malloc-compare: PYTHONPATH holding the release's `flextok` (and its deps)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(timed_child(args.child, args)))
        return
    if args.malloc_compare:
        args.load0 = os.getloadavg()
        malloc_compare(args)
        return
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
