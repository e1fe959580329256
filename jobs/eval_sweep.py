"""Reconstruction sweep: rFID (and precision/recall, IS, PSNR/SSIM/MSE) for every token count k.

    python jobs/eval_sweep.py --model out/flextok --input data/val/ --ks 1,2,4,8,16,32,64,128,256 \\
        --num-samples 50000 --output runs/sweep [--reference-stats ref.npz] [--guidance-scale 7.5 --apg]
    python jobs/eval_sweep.py --model out/flextok --input out/corpus/ --reference-stats ref.npz ...  # tokens

Each image is encoded once; every k is decoded in batches that mix k's; Inception features are merged per k
on the driver. Without --reference-stats the originals' features are computed in the same pass (and saved as
reference_stats.npz for the next run). Outputs in --output: results.json, results.md, fid_vs_tokens.png,
recon_grid.png, and partial/ (chunks of finished images: a rerun with the same settings resumes from them).
--num-samples takes the first N inputs; unreadable ones are listed in results.json and skipped. The last
line of standard output is a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import asdict
from pathlib import Path

from jobs.common import fail, parse_args, run_main
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
    print_result,
    progress,
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
    p.add_argument("--grid-images", type=int, default=8, help="rows of recon_grid.png")
    add_sweep_args(p)
    add_resource_args(p, "decoder actors (FlexTok: encode once, decode every k)", batch_size=8)
    return p


def is_corpus(inputs: list[str]) -> bool:
    """A single folder with the corpus's commit markers (pipeline.corpus) is a token corpus."""
    from pipeline.corpus import UNITS_DIR, join, output_fs

    if len(inputs) != 1:
        return False
    fs, root = output_fs(inputs[0])
    return fs.isdir(join(root, UNITS_DIR))


def check_corpus(path: str, model_sha256: str, ks: tuple[int, ...], resolution: int) -> None:
    from pipeline.corpus import corpus_files

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


def source_dataset(args: argparse.Namespace, corpus: bool, resolution: int):
    from pipeline.sources import InputError, image_dataset

    try:
        if corpus:
            from pipeline.corpus import read_corpus

            ds = read_corpus(args.input[0])
        else:
            ds = image_dataset(args.input, resolution, labels=args.labels)
    except (InputError, OSError, ValueError) as e:
        fail(f"--input: {e}")
    return ds.limit(args.num_samples) if args.num_samples else ds


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
    started = time.time()

    from pipeline import report
    from pipeline import sweep as S
    from pipeline.features import ordered_execution, with_inception_features
    from pipeline.fid import Reference, save_reference
    from pipeline.preprocess import PREPROCESSING

    # every check before any work: model, k's, Inception, reference, input
    info, model_sha256 = flextok_info(args.model)  # the actors load the model; the driver reads its files
    R, num_registers = info.cfg.image_size, info.cfg.num_registers
    ks = sweep_ks(args.ks, num_registers)
    weights, identity, has_classifier = inception_setup(args)
    preprocessing = f"{PREPROCESSING} @ {R}px, uint8"
    reference = checked_reference(args.reference_stats, identity, R) if args.reference_stats else None
    corpus = is_corpus(args.input)
    if corpus:
        check_corpus(args.input[0], model_sha256, ks, R)
        if reference is None:
            fail("a token corpus holds no images: give --reference-stats (e.g. from eval_fid --save-stats)")
    real_features = reference is None
    settings = S.DecodeSettings(args.timesteps, args.guidance_scale, args.apg, args.seed, args.decode_batch)
    groups = ((S.REAL,) if real_features else ()) + ks
    partial = S.PartialResults(
        args.output / "partial",
        S.run_fingerprint(
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
        ),
        groups,
    )
    init_ray(worker_logs=False)
    res, inception_res = sweep_resources(args, "eval_sweep")
    ds = source_dataset(args, corpus, R)  # an empty or missing input fails here, before anything is written
    try:
        partial.open()
    except S.ResumeMismatchError as e:
        fail(str(e))

    with ordered_execution():
        grid_keys = [str(r["key"]) for r in ds.limit(args.grid_images).select_columns(["key"]).take_all()]
        collector = S.Collector(partial, groups, args.chunk_images, lambda p: progress(f"[eval_sweep] saved {p.name}"))
        if collector.done:
            progress(f"[eval_sweep] resuming: {len(collector.done)} images already in {partial.folder}")
            done = frozenset(collector.done)
            ds = ds.filter(lambda row: row["key"] not in done)
        stage = dict(
            model=local_or_hub(args.model),
            ks=ks,
            settings=asdict(settings),
            grid_keys=grid_keys,
            real_features=real_features,
            device=res.device,
            threads=res.threads,
        )
        ds = ds.map_batches(S.ReconstructStage, fn_constructor_kwargs=stage, **res.map_kwargs())
        ds = with_inception_features(ds, weights, inception_res)
        progress(
            f"[eval_sweep] k={list(ks)}: {res.workers} decoder actor(s), {inception_res.workers} Inception actor(s)"
        )
        collector.consume(ds)

    gathered = S.gather(partial)
    if not gathered.keys:
        fail(f"no readable images in --input ({len(gathered.errors)} bad inputs)")
    if reference is None:
        kept = gathered.features[S.REAL] if args.prc or args.kid else None
        reference = Reference.from_stats(gathered.stats[S.REAL], identity, preprocessing, " ".join(args.input), kept)
        save_reference(args.output / "reference_stats.npz", reference)
    results = report.summarize(gathered, ks, reference, metric_options(args))
    provenance = {
        "model": {"path": str(args.model), "sha256": model_sha256, "image_size": R, "num_registers": num_registers},
        "data": {
            "inputs": args.input,
            "kind": "corpus" if corpus else "images",
            "labels": args.labels,
            "num_samples_requested": args.num_samples,
            "keys_sha256": hashlib.sha256("\n".join(sorted(gathered.keys)).encode()).hexdigest(),
            "preprocessing": None if corpus else preprocessing,
        },
        "seeds": {
            "seed": args.seed,
            "decoder_noise": "per (image key, k): torch.Generator seeded by sha256(seed|key|k)",
        },
        "settings": {
            "ks": list(ks),
            **asdict(settings),
            "batch_size": res.batch_size,
            "chunk_images": args.chunk_images,
        },
        "inception": {"identity": identity, "weights": str(weights), "classifier": has_classifier},
        "reference": {
            "source": reference.source,
            "n": reference.n,
            "extractor": reference.extractor,
            "preprocessing": reference.preprocessing,
            "computed_in_this_pass": real_features,
        },
        "versions": versions(),
    }
    run = {"wall_s": round(time.time() - started, 1), "images_this_run": collector.images_this_run}
    name = Path(str(args.model).rstrip("/")).name
    title = f"{name}: {len(gathered.keys)} images, {args.timesteps} steps, guidance {args.guidance_scale}"
    files = report.write_outputs(
        args.output, results, provenance, run, gathered, ks, grid_keys, "recon_grid.png", not corpus, "rFID", title
    )
    print_result({"files": files, "per_k": results["per_k"], "work": results["work"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
