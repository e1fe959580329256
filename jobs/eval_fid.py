"""FID (and KID, precision/recall, IS) between two sources, features computed on Ray Data.

    python jobs/eval_fid.py --real data/val/ --fake samples/ [--inception-weights W.pth] [--kid] [--prc]
    python jobs/eval_fid.py --real data/val-{000..063}.tar --save-stats ref.npz --resolution 256   # reference only
    python jobs/eval_fid.py --real ref.npz --fake samples-{000..009}.tar

A SRC is anything the pretokenize job reads (image folders, webdataset shards, Parquet with image bytes;
globs and {a..b} ranges) or a statistics `.npz` (ours, or ADM's VIRTUAL_imagenet256_labeled.npz). Images
are ADM-center-cropped to --resolution and fed to Inception as uint8. The last line of output is one JSON
object: fid, counts, extractor identity, and kid/precision/recall/IS when asked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.common import fail, parse_args, run_main
from jobs.eval_common import (
    add_inception_args,
    add_resource_args,
    check_resource_args,
    inception_weights,
    print_result,
    progress,
    stage_resources,
)
from jobs.resources import Cluster, Plan, actor_stage_plan, cluster_now, init_ray, warn_if_short
from pipeline.eval import fid as F


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", nargs="+", help="reference images (URLs/globs) or one statistics .npz")
    p.add_argument("--fake", nargs="+", help="sample images (URLs/globs) or one statistics .npz")
    p.add_argument("--resolution", type=int, default=256, help="ADM center crop size for image sources")
    p.add_argument("--labels", help="labels CSV for folder sources (not needed for FID)")
    p.add_argument("--save-stats", help="write --real's statistics (a reference) to this .npz (path or URL)")
    p.add_argument("--save-fake-stats", help="write --fake's statistics to this .npz (path or URL)")
    p.add_argument("--kid", action="store_true", help="also the Kernel Inception Distance")
    p.add_argument("--prc", action="store_true", help="also precision and recall (k-NN manifolds, k=3)")
    p.add_argument("--isc", action="store_true", help="also the Inception Score of --fake (needs a classifier)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    add_inception_args(p)
    add_resource_args(p, "Inception actors")
    return p


@dataclass
class Side:
    """One side of the comparison: statistics plus what the metrics beyond FID need."""

    name: str
    ref: F.Reference
    count: int
    logits: np.ndarray | None = None
    feature_passes: int = 0
    errors: list | None = None


def is_stats_file(src: list[str]) -> bool:
    return len(src) == 1 and src[0].endswith(".npz")


def load_side(name: str, src: list[str], identity: str) -> Side:
    try:
        ref = F.load_reference(src[0])
        ref.check_extractor(identity)
    except (OSError, ValueError) as e:
        fail(f"--{name}: {e}")
    return Side(name, ref, ref.n or 0)


def compute_side(name: str, src: list[str], args, weights: Path, identity: str, keep: bool, logits: bool) -> Side:
    from pipeline.data.preprocess import PREPROCESSING
    from pipeline.data.sources import InputError, image_dataset
    from pipeline.eval.features import collect_features, ordered_execution, with_inception_features

    res = inception_resources(args)

    try:
        ds = image_dataset(src, args.resolution, labels=args.labels)
    except (InputError, ValueError, OSError) as e:
        fail(f"--{name}: {e}")
    progress(f"[eval_fid] {name}: Inception features of {' '.join(src)} at {args.resolution}px")
    with ordered_execution():
        got = collect_features(with_inception_features(ds, weights, res), keep_features=keep, keep_logits=logits)
    for e in got.errors:
        progress(f"[eval_fid] {name}: skipped bad input {e.get('key')!r} ({e.get('error_class')}: {e.get('error')})")
    if got.count < 2:
        fail(f"--{name}: {got.count} readable image(s) in {' '.join(src)}; FID needs at least 2")
    progress(f"[eval_fid] {name}: {got.count} images, {len(got.errors)} bad inputs")
    preprocessing = f"{PREPROCESSING} @ {args.resolution}px, uint8"
    ref = F.Reference.from_stats(got.stats, identity, preprocessing, " ".join(src), got.features)
    return Side(name, ref, got.count, got.logits, got.feature_passes, got.errors)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if not args.real:
        fail("--real is required (images or a statistics .npz)")
    if not args.fake and not args.save_stats:
        fail("give --fake to compare against, or --save-stats to only compute the reference")
    if args.save_stats and is_stats_file(args.real):
        fail("--save-stats writes statistics computed from --real images; --real is already a .npz")
    if args.isc and not args.fake:
        fail("--isc scores the --fake images; give --fake")
    check_resource_args(args)

    from pipeline.inception import NO_CLASSIFIER, has_classifier, load_weights, weights_identity

    weights = inception_weights(args)
    try:
        state = load_weights(weights)
    except (OSError, ValueError) as e:
        fail(f"--inception-weights: {e}")
    identity = weights_identity(state)
    if args.isc and not has_classifier(state):
        fail(f"--isc: {NO_CLASSIFIER} ({weights})")
    need_features = args.kid or args.prc

    real_is_file = is_stats_file(args.real)
    fake_is_file = bool(args.fake) and is_stats_file(args.fake)
    real = load_side("real", args.real, identity) if real_is_file else None
    fake = load_side("fake", args.fake, identity) if fake_is_file else None
    for side in (real, fake):
        if side is not None and need_features:
            try:
                side.ref.need_features("--kid/--prc")
            except ValueError as e:
                fail(f"--{side.name}: {e}")
    if not (real_is_file and (fake_is_file or not args.fake)):
        init_ray(worker_logs=False)
    if real is None:
        real = compute_side("real", args.real, args, weights, identity, need_features or bool(args.save_stats), False)
    if args.fake and fake is None:
        fake = compute_side("fake", args.fake, args, weights, identity, need_features, args.isc)

    if args.save_stats:
        F.save_reference(args.save_stats, real.ref)
        progress(f"[eval_fid] wrote reference statistics of {real.count} images to {args.save_stats}")
    if args.save_fake_stats and fake is not None and not fake_is_file:
        F.save_reference(args.save_fake_stats, fake.ref)

    result: dict = {"extractor": identity, "inception_weights": str(weights), "real": side_summary(real)}
    if fake is not None:
        if (
            real.ref.extractor is not None
            and fake.ref.extractor is not None
            and real.ref.extractor != fake.ref.extractor
        ):
            fail(f"--real uses extractor '{real.ref.extractor}' but --fake uses '{fake.ref.extractor}'")
        result["fake"] = side_summary(fake)
        result["fid"] = real.ref.frechet().distance(fake.ref.mu, fake.ref.sigma, F.low_rank_factor(fake.ref.features))
        if args.kid:
            result.update(
                F.kernel_inception_distance(
                    fake.ref.features, real.ref.features, args.kid_subsets, args.kid_subset_size
                )
            )
        if args.prc:
            result.update(F.precision_recall(fake.ref.features, real.ref.features))
        if args.isc:
            result.update(F.inception_score(fake.logits))
    print_result(result)
    return 0


def resource_plan(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """One Inception stage fed by reading tasks."""
    return actor_stage_plan("inception", args, cluster)


def inception_resources(args: argparse.Namespace):
    """The Inception stage, fitted to the cluster. Call after init_ray()."""
    cluster = cluster_now()
    plan = resource_plan(args, cluster)
    warn_if_short(plan, cluster, "eval fid")
    return stage_resources(plan.stage("inception"), args.batch_size, args.torch_threads)


def side_summary(side: Side) -> dict:
    out = {"source": side.ref.source, "count": side.count, "extractor": side.ref.extractor}
    if side.errors is not None:
        out["bad_inputs"] = len(side.errors)
        out["feature_passes"] = side.feature_passes
    return out


if __name__ == "__main__":
    raise SystemExit(run_main(main))
