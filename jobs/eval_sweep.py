"""Reconstruction sweep: rFID (and precision/recall, IS, PSNR/SSIM/MSE) for every token count k.

    python jobs/eval_sweep.py --model out/flextok --input data/val/ --ks 1,2,4,8,16,32,64,128,256 \\
        --num-samples 50000 --output runs/sweep [--reference-stats ref.npz] [--guidance-scale 7.5 --apg]
    python jobs/eval_sweep.py --model out/flextok --input out/corpus/ --reference-stats ref.npz ...  # tokens
    python jobs/eval_sweep.py ... --ks 1,2,4,8,16,32 --adaptive psnr:14,psnr:16 [--ladder 1,2,4,8,16,32]

Each image is encoded once; every k is decoded in batches that mix k's; Inception features are merged per k
on the driver. Without --reference-stats the originals' features are computed in the same pass (and saved as
reference_stats.npz for the next run). Outputs in --output: results.json, results.md, fid_vs_tokens.png,
recon_grid.png, and partial/ (chunks of finished images: a rerun with the same settings resumes from them).
--adaptive adds, per target, the k each image's pretokenize --adaptive search would pick, read off the table
of decoded k's (no extra decoder call): rate against quality in results.json, rate_vs_quality.png and
adaptive_grid.png (docs/adaptive.md). The ladder is the sweep's k's unless --ladder picks some of them.
--num-samples takes the first N inputs; unreadable ones are listed in results.json and skipped. The last
line of standard output is a JSON summary.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from jobs.common import fail, parse_args, run_main, user_message
from jobs.eval_common import (
    add_resource_args,
    add_sweep_args,
    check_resource_args,
    check_sweep_args,
    checked_reference,
    flextok_info,
    inception_setup,
    local_or_hub,
    metric_options,
    run_sweep,
    sweep_ks,
    sweep_resources,
    versions,
)
from jobs.resources import Cluster, Plan, init_ray, sweep_plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="FlexTok checkpoint folder (ours or official) or hub id")
    p.add_argument("--input", nargs="+", help="images (folders, .tar shards, Parquet; globs) or a token corpus folder")
    p.add_argument("--labels", help="labels CSV for folder inputs")
    p.add_argument("--num-samples", type=int, help="evaluate the first N inputs (default: all)")
    p.add_argument("--grid-images", type=int, default=8, help="rows of recon_grid.png (and adaptive_grid.png)")
    p.add_argument(
        "--adaptive",
        help="adaptive targets to evaluate, e.g. psnr:14,psnr:16, inception:0.1 or psnr-slope:0.1 (per image: the "
        "k pretokenize --adaptive would pick: the smallest ladder k meeting the target, or for psnr-slope the k "
        "after which more tokens gain less than LAMBDA dB each)",
    )
    p.add_argument("--ladder", help="the adaptive search's ladder, some of --ks (default: all of --ks)")
    add_sweep_args(p)
    add_resource_args(p, "decoder actors (FlexTok: encode once, decode every k)", batch_size=8)
    return p


def is_corpus(inputs: list[str]) -> bool:
    """A single folder with the corpus's commit markers (pipeline.data.corpus) is a token corpus."""
    from pipeline.data.corpus import UNITS_DIR, join, output_fs

    if len(inputs) != 1:
        return False
    fs, root = output_fs(inputs[0])
    return fs.isdir(join(root, UNITS_DIR))


def check_corpus(path: str, model_sha256: str, ks: tuple[int, ...], resolution: int) -> str:
    """The corpus's augment mode, once it is known to fit the model and the k's."""
    from pipeline.data.corpus import corpus_files
    from pipeline.eval.sweep import check_sweepable

    try:
        _, _, meta = corpus_files(path)
    except (OSError, ValueError) as e:
        fail(f"--input {path}: {e}")
    if meta.tokenizer_sha256 != model_sha256:
        made_by = f"{meta.tokenizer} ({meta.tokenizer_sha256[:12]})"
        fail(f"--input {path} was tokenized by {made_by}, not by --model ({model_sha256[:12]})")
    if meta.num_tokens < max(ks):
        fail(f"--input {path} stores {meta.num_tokens} tokens per image; --ks asks for up to {max(ks)}")
    if meta.resolution != resolution:
        fail(f"--input {path} was tokenized at {meta.resolution}px; the model decodes {resolution}px")
    try:
        check_sweepable(meta.augment)
    except ValueError as e:
        fail(f"--input {path}: {e}")
    return meta.augment


def source_dataset(args: argparse.Namespace, augment: str | None, resolution: int):
    """The inputs as rows (images, or a corpus's un-augmented token rows when `augment` is its mode)."""
    from pipeline.data.sources import InputError, image_dataset
    from pipeline.eval.sweep import center_views

    try:
        if augment is not None:
            from pipeline.data.corpus import read_corpus

            ds = center_views(read_corpus(args.input[0]), augment)
        else:
            ds = image_dataset(args.input, resolution, labels=args.labels)
    except (InputError, OSError, ValueError) as e:
        fail(f"--input: {e}")
    return ds.limit(args.num_samples) if args.num_samples else ds


def adaptive_plan(args: argparse.Namespace, ks: tuple[int, ...], num_registers: int, corpus: bool):
    """--adaptive and --ladder as a plan (None without --adaptive); each problem is one error line."""
    from pipeline.data.adaptive import parse_ladder
    from pipeline.eval.sweep_adaptive import AdaptivePlan, check_ladder, parse_targets

    if args.adaptive is None:
        if args.ladder is not None:
            fail("--ladder needs --adaptive")
        return None
    if corpus:
        fail("--adaptive needs the original images to score reconstructions; --input is a token corpus")
    try:
        criteria = parse_targets(args.adaptive)
        ladder = check_ladder(parse_ladder(args.ladder, num_registers), ks) if args.ladder else ks
    except ValueError as e:
        fail(user_message(e))
    return AdaptivePlan(criteria, ladder)


def resource_plan(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """Decoder actors and the Inception stage, at the same time."""
    return sweep_plan(args, cluster)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    for name in ("model", "input", "output"):
        if not getattr(args, name):
            fail(f"--{name} is required")
    if args.num_samples is not None and args.num_samples < 1:
        fail("--num-samples must be >= 1")
    check_sweep_args(args)
    check_resource_args(args)

    from pipeline.data.preprocess import PREPROCESSING
    from pipeline.eval import sweep as S
    from pipeline.eval.features import ordered_execution
    from pipeline.eval.report import Report
    from pipeline.eval.sweep_run import InPassReference, SweepSpec, run_fingerprint

    # every check before any work: model, k's, Inception, reference, input
    info, model_sha256 = flextok_info(args.model)  # the actors load the model; the driver reads its files
    R, num_registers = info.cfg.image_size, info.cfg.num_registers
    ks = sweep_ks(args.ks, num_registers)
    weights, identity, has_classifier = inception_setup(args)
    preprocessing = f"{PREPROCESSING} @ {R}px, uint8"
    reference = checked_reference(args.reference_stats, identity, R) if args.reference_stats else None
    corpus = is_corpus(args.input)
    augment = check_corpus(args.input[0], model_sha256, ks, R) if corpus else None
    if corpus and reference is None:
        fail("a token corpus holds no images: give --reference-stats (e.g. from eval_fid --save-stats)")
    adaptive = adaptive_plan(args, ks, num_registers, corpus)
    # the originals' features: for the in-pass reference, and for an Inception target's distances
    real_features = reference is None or (adaptive is not None and adaptive.needs_original_features)
    settings = S.DecodeSettings(args.timesteps, args.guidance_scale, args.apg, args.seed, args.decode_batch)
    init_ray(worker_logs=False)
    res, inception_res = sweep_resources(args, "eval_sweep")
    ds = source_dataset(args, augment, R)  # an empty or missing input fails here, before anything is written
    with ordered_execution():
        grid_keys = [str(r["key"]) for r in ds.limit(args.grid_images).select_columns(["key"]).take_all()]

    fingerprint = run_fingerprint(
        kind="reconstruction",
        model_sha256=model_sha256,
        inputs=args.input,
        input_kind="corpus" if corpus else "images",
        labels=args.labels,
        num_samples=args.num_samples,
        ks=ks,
        **asdict(settings),
        batch_size=args.batch_size,
        inception=identity,
        reference=None if reference is None else [reference.source, reference.extractor, reference.n],
        chunk_images=args.chunk_images,
        grid_images=args.grid_images,
        real_features=real_features,
    )
    provenance = {
        "model": {"path": str(args.model), "sha256": model_sha256, "image_size": R, "num_registers": num_registers},
        "data": {
            "inputs": args.input,
            "kind": "corpus" if corpus else "images",
            "augment_used": None if augment is None else "aug 0 (the un-augmented view) of each image",
            "labels": args.labels,
            "num_samples_requested": args.num_samples,
            "preprocessing": None if corpus else preprocessing,
        },
        "seeds": {
            "seed": args.seed,
            "decoder_noise": "per image key, the same at every k: torch.Generator seeded by sha256(seed|key)",
        },
        "settings": {
            "ks": list(ks),
            **asdict(settings),
            "batch_size": res.batch_size,
            "chunk_images": args.chunk_images,
            "feature_subset": args.feature_subset,
            "adaptive": None if adaptive is None else [str(c) for c in adaptive.criteria],
            "ladder": None if adaptive is None else list(adaptive.ladder),
        },
        "inception": {"identity": identity, "weights": str(weights), "classifier": has_classifier},
        "versions": versions(),
    }
    name = Path(str(args.model).rstrip("/")).name
    spec = SweepSpec(
        name="eval_sweep",
        output=str(args.output),
        ks=ks,
        fingerprint=fingerprint,
        stage=S.ReconstructStage,
        stage_kwargs=dict(
            model=local_or_hub(args.model),
            ks=ks,
            settings=asdict(settings),
            grid_keys=grid_keys,
            real_features=real_features,
            device=res.device,
            threads=res.threads,
        ),
        model_resources=res,
        inception_weights=str(weights),
        inception_resources=inception_res,
        chunk_images=args.chunk_images,
        metrics=metric_options(args),
        reference=reference or InPassReference(identity, preprocessing, " ".join(args.input)),
        report=Report(
            provenance=provenance,
            run={},
            grid_keys=grid_keys,
            grid_file="recon_grid.png",
            with_original=not corpus,
            metric_name="rFID",
            title=f"{name}: {{n}} images, {args.timesteps} steps, guidance {args.guidance_scale}",
        ),
        adaptive=adaptive,
    )
    run_sweep(spec, lambda done: ds.filter(lambda row: row["key"] not in done) if done else ds)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
