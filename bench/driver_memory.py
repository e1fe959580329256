"""Peak memory of a driver that needs a checkpoint's metadata and weights digest: read from the files (what the
pretokenize and sweep drivers do) vs. building the model (what they used to do), side by side.

    .venv/bin/python bench/driver_memory.py                      # d12_d12-sized random checkpoint, metadata step
    .venv/bin/python bench/driver_memory.py --pretokenize        # also the whole pretokenize driver on 2 images

The checkpoint (random weights) is written to a temporary folder. Each measurement runs in a fresh Python
process and reports its peak resident set size (VmHWM in /proc/self/status); for the pretokenize driver
that is the driver alone (Ray's tokenizer actor is another process, on a worker node in a cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MB = 1024

CHILD = """
import json, sys, time
mode, model = sys.argv[1], sys.argv[2]
start = time.perf_counter()
out = {}
if mode == "imports":
    import torch, flextok.checkpoint  # noqa: F401  - what every variant pays before it reads anything
elif mode == "files":
    from flextok.checkpoint import read_checkpoint_info
    info = read_checkpoint_info(model)
    out = {"digest": info.digest(), "num_registers": info.cfg.num_registers, "codebook": info.codebook_size}
elif mode == "model":
    from flextok import FlexTok
    from flextok.checkpoint import weights_digest
    m = FlexTok.from_pretrained(model)
    out = {"digest": weights_digest(m.state_dict()), "num_registers": m.num_registers, "codebook": m.codebook_size}
elif mode == "pretokenize":
    import ray
    for attempt in range(3):  # a loaded machine can miss Ray's fixed 30 s start-up wait; the job joins this Ray
        try:
            ray.init(include_dashboard=False, configure_logging=False)
            break
        except Exception:
            ray.shutdown()
    from jobs.common import run_main
    from jobs.pretokenize import main
    out = {"status": run_main(main, ["--model", model, "--input", sys.argv[3], "--output", sys.argv[4],
                                     "--batch-size", "2", "--workers", "1", "--cpus-per-worker", "1"])}
out["seconds"] = round(time.perf_counter() - start, 1)
# VmHWM: this process's peak RSS since exec (ru_maxrss would also count the parent's memory at fork time)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["peak_mb"] = round(hwm_kb / 1024, 1)
print(json.dumps(out))
"""


def measure(mode: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, *args], env=env, capture_output=True, text=True, cwd=REPO, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="d12_d12", help="model size of the random checkpoint (default d12_d12)")
    p.add_argument("--pretokenize", action="store_true", help="also run the pretokenize driver on 2 images")
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-sample")
    args = p.parse_args()

    import torch

    from flextok import FlexTok, preset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        model = FlexTok(preset(args.preset))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / "model")
        del model
        size_mb = (work / "model" / "model.safetensors").stat().st_size / 2**20
        print(f"checkpoint: {args.preset}, {params / 1e6:.0f} M parameters, model.safetensors {size_mb:.0f} MiB")

        print(f"{'driver step':52s} {'peak RSS (MiB)':>15s} {'wall (s)':>9s}", flush=True)
        rows = []
        for name, mode in (
            ("python + torch + flextok imports", "imports"),
            ("metadata + digest from the files (now)", "files"),
            ("metadata + digest by building the model (before)", "model"),
        ):
            rows.append((name, measure(mode, str(work / "model"))))
            print(f"{name:52s} {rows[-1][1]['peak_mb']:15.0f} {rows[-1][1]['seconds']:9.1f}", flush=True)
        if args.pretokenize:
            images = work / "images"
            images.mkdir()
            for path in sorted(args.images.glob("*.JPEG"))[:2]:
                shutil.copy(path, images / path.name)
            rows.append(
                (
                    "whole pretokenize driver, 2 images",
                    measure("pretokenize", str(work / "model"), str(images), str(work / "out")),
                )
            )

    if args.pretokenize:
        name, r = rows[-1]
        print(f"{name:52s} {r['peak_mb']:15.0f} {r['seconds']:9.1f}   (job exit status {r['status']})")
        if r["status"] != 0:
            print("FAIL: the pretokenize job failed")
            return 1
    files, built = rows[1][1], rows[2][1]
    same = files["digest"] == built["digest"]
    print(f"digest from files == digest of the built model: {same} ({files['digest'][:16]}...)")
    over = [name for name, r in rows[1:2] + rows[3:] if r["peak_mb"] > LIMIT_MB]
    if over or not same:
        print(f"FAIL: over {LIMIT_MB} MiB: {over}" if over else "FAIL: digests differ")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
