"""FID two ways on the same image folders, side by side in one run, and the sweep's work counters.

    python bench/fid.py                                   # 2 x 100 ImageNet-sample photos at 64px, local Ray
    python bench/fid.py --real A/ --fake B/ --resolution 256 --workers 2
    python bench/fid.py --skip-sweep

1. Our pipeline (jobs/eval_fid: Ray Data, Inception actors, driver-merged float64 statistics) and
   torch_fidelity.calculate_metrics, same weights, same images: both FIDs (they must agree to 1e-3), wall
   times and their ratio. Ray is started before the clock starts (a running cluster is the normal case).
2. The reconstruction sweep on a tiny random FlexTok, once computing the reference from the same images and
   once with the cached reference: encoder calls per image (must be 1) and real-image feature passes per
   image (1, then 0).
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = Path(os.environ.get("FLEXTOK_SHARED", REPO.parent / "shared")) / "data" / "imagenet-sample"


def make_folders(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """2 x n sample photos as square PNGs (center crop, bicubic), alternating between the two folders."""
    from PIL import Image

    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()
    photos = sorted(SAMPLE.glob("*.JPEG"))[: 2 * n]
    if len(photos) < 2 * n:
        raise SystemExit(f"need {2 * n} photos in {SAMPLE}, found {len(photos)}")
    for i, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        s = min(img.size)
        img = img.crop(((img.width - s) // 2, (img.height - s) // 2, (img.width + s) // 2, (img.height + s) // 2))
        img.resize((size, size), Image.BICUBIC).save((a if i % 2 == 0 else b) / f"{i:04d}.png")
    return a, b


def last_json(fn, argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fn(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def bench_fid(args, weights: Path) -> bool:
    import torch
    import torch_fidelity

    from jobs.eval_fid import main as eval_fid
    from pipeline.inception import weights_only_loads

    common = ["--resolution", str(args.resolution), "--inception-weights", str(weights)]
    common += ["--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker)]
    common += ["--gpus-per-worker", str(args.gpus_per_worker), "--batch-size", str(args.batch_size)]
    common += ["--torch-threads", str(args.torch_threads)]
    t0 = time.perf_counter()
    ours = last_json(eval_fid, ["--real", str(args.real), "--fake", str(args.fake), *common])
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    with weights_only_loads():
        theirs = torch_fidelity.calculate_metrics(
            input1=str(args.fake),
            input2=str(args.real),
            fid=True,
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=str(weights),
            cuda=torch.cuda.is_available(),
            batch_size=args.batch_size,
            cache=False,
            verbose=False,
        )["frechet_inception_distance"]
    t_theirs = time.perf_counter() - t0

    diff = abs(ours["fid"] - theirs)
    n = ours["real"]["count"] + ours["fake"]["count"]
    print(f"\n== FID: {ours['real']['count']} real vs {ours['fake']['count']} fake images, {args.resolution}px")
    print(f"{'':28s} {'FID':>14s} {'wall s':>8s} {'img/s':>7s}")
    print(f"{'ours (Ray Data, local)':28s} {ours['fid']:14.6f} {t_ours:8.1f} {n / t_ours:7.1f}")
    print(f"{'torch-fidelity':28s} {theirs:14.6f} {t_theirs:8.1f} {n / t_theirs:7.1f}")
    print(f"|FID difference| = {diff:.2e} (must be < 1e-3): {'OK' if diff < 1e-3 else 'FAIL'}")
    print(f"time ours / torch-fidelity = {t_ours / t_theirs:.2f}")
    return diff < 1e-3


def bench_sweep_counters(args, weights: Path, root: Path) -> bool:
    import torch

    from flextok import FlexTok, preset
    from jobs.eval_sweep import main as eval_sweep

    torch.manual_seed(0)
    model = FlexTok(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "tiny")
    common = ["--model", str(root / "tiny"), "--input", str(args.real), "--ks", "1,2,4,8,16,32"]
    common += ["--num-samples", str(args.sweep_images), "--timesteps", "5", "--inception-weights", str(weights)]
    common += ["--cpus-per-worker", str(args.sweep_cpus_per_worker), "--gpus-per-worker", str(args.gpus_per_worker)]
    first = last_json(eval_sweep, [*common, "--output", str(root / "s1")])
    cached = last_json(
        eval_sweep,
        [*common, "--output", str(root / "s2"), "--reference-stats", str(root / "s1" / "reference_stats.npz")],
    )
    print(f"\n== sweep work counters: tiny random FlexTok, {args.sweep_images} images, k = 1..32 (6 values)")
    print(f"{'':34s} {'encoder calls/image':>20s} {'real feature passes/image':>26s}")
    ok = True
    for name, out, want_real in (
        ("reference computed in the pass", first, 1.0),
        ("cached reference stats", cached, 0.0),
    ):
        w = out["work"]
        good = w["encoder_calls_per_image"] == 1.0 and w["real_feature_passes"] == want_real
        ok &= good
        calls, passes = w["encoder_calls_per_image"], w["real_feature_passes"]
        print(f"{name:34s} {calls:20.2f} {passes:26.2f}  {'OK' if good else 'FAIL'}")
    same = [r["fid"] for r in first["per_k"]] == [r["fid"] for r in cached["per_k"]]
    print(f"rFID per k identical with the cached reference: {'OK' if same else 'FAIL'}")
    return ok and same


def torch_threads_default() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=Path)
    p.add_argument("--fake", type=Path)
    p.add_argument("--num-images", type=int, default=100, help="per folder, when the folders are made here")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--inception-weights", type=Path)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="our Inception actor (1 stage)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--torch-threads", type=int, default=torch_threads_default(), help="as torch-fidelity's process")
    p.add_argument("--sweep-cpus-per-worker", type=float, default=0.5, help="two actor stages must fit the node")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sweep-images", type=int, default=16)
    p.add_argument("--skip-sweep", action="store_true")
    args = p.parse_args()

    import ray

    from pipeline.inception import ensure_inception_weights

    weights = args.inception_weights or ensure_inception_weights()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.real is None or args.fake is None:
            args.real, args.fake = make_folders(root, args.num_images, args.resolution)
        t0 = time.perf_counter()
        ray.init(address="local", log_to_driver=False, configure_logging=False, include_dashboard=False)
        print(f"ray.init: {time.perf_counter() - t0:.1f} s (not counted below)")
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        ok = bench_fid(args, weights)
        if not args.skip_sweep:
            ok &= bench_sweep_counters(args, weights, root)
        ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
