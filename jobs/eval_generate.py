"""Generation sweep: gFID (and precision/recall, IS) of class-conditional AR samples for every token count k.

    python jobs/eval_generate.py --ar-model out/ar --model out/flextok --output runs/gen \\
        --reference-stats VIRTUAL_imagenet256_labeled.npz --ks 1,2,4,8,16,32,64,128,256 --cfg-scale 3

For each k the AR model samples k tokens for class-balanced labels (sample i gets class i % num_classes),
FlexTok decodes them (batches mix k's), Inception features are merged per k on the driver and compared with
--reference-stats (ours from eval_fid --save-stats / eval_sweep, or ADM's). Outputs in --output:
results.json (per k, provenance), results.md, fid_vs_tokens.png, samples_grid.png (rows = samples, columns =
k), partial/ (a rerun with the same settings resumes). The last line of standard output is a JSON summary.

An AR model with an end-of-sequence token stops each sample at its EOS, k being the most tokens it may take;
results.json then adds `length_summary` (per k: mean generated length and its histogram), results.md a table.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--ar-model", help="AR checkpoint folder (flextok.ar.ARModel.save_pretrained)")
    p.add_argument("--model", help="FlexTok checkpoint folder or hub id (the AR model's tokenizer)")
    p.add_argument("--num-samples", type=int, default=50_000, help="samples per k")
    p.add_argument("--gen-batch", type=int, default=32, help="samples per AR generate call (a unit of determinism)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="AR classifier-free guidance")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--grid-samples", type=int, default=8, help="rows of samples_grid.png")
    add_sweep_args(p)
    add_resource_args(p, "generator actors (AR model + FlexTok decoder)", batch_size=1)
    return p


def ar_info(path: str):
    """(config, weights digest) of --ar-model, from its files."""
    from flextok.ar import ARModel
    from flextok.checkpoint import CheckpointError

    try:
        return ARModel.read_config(path), ARModel.file_digest(path)
    except (OSError, ValueError, CheckpointError) as e:
        fail(f"--ar-model {path}: {e}")


def resource_plan(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """Decoder actors and the Inception stage, at the same time."""
    return sweep_plan(args, cluster)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    for name in ("ar_model", "model", "reference_stats", "output"):
        if not getattr(args, name):
            fail(f"--{name.replace('_', '-')} is required")
    if args.num_samples < 2 or args.gen_batch < 1:
        fail("--num-samples must be >= 2 and --gen-batch >= 1")
    check_sweep_args(args)
    check_resource_args(args)

    from pipeline.data.corpus import join
    from pipeline.eval import generate as G
    from pipeline.eval import sweep as S
    from pipeline.eval.report import Report
    from pipeline.eval.sweep_run import SweepSpec, run_fingerprint

    # every check before any work
    # the actors load the models; the driver reads their files
    (ar_cfg, ar_sha256), (info, model_sha256) = ar_info(args.ar_model), flextok_info(args.model)
    ks = sweep_ks(args.ks, min(info.cfg.num_registers, ar_cfg.max_tokens))
    if ar_cfg.vocab_size != info.codebook_size:
        fail(f"--ar-model predicts {ar_cfg.vocab_size} token ids; --model's codebook has {info.codebook_size}")
    num_classes, R = ar_cfg.num_classes, info.cfg.image_size
    sampling = G.SamplingSettings(args.cfg_scale, args.temperature, args.top_k, args.top_p)
    weights, identity, has_classifier = inception_setup(args)
    reference = checked_reference(args.reference_stats, identity, R)
    settings = S.DecodeSettings(args.timesteps, args.guidance_scale, args.apg, args.seed, args.decode_batch)
    init_ray(worker_logs=False)
    res, inception_res = sweep_resources(args, "eval_generate")
    grid_keys = [G.sample_key(i) for i in range(min(args.grid_samples, args.num_samples))]

    fingerprint = run_fingerprint(
        kind="generation",
        ar_sha256=ar_sha256,
        model_sha256=model_sha256,
        num_samples=args.num_samples,
        gen_batch=args.gen_batch,
        ks=ks,
        **asdict(sampling),
        **asdict(settings),
        inception=identity,
        reference=[reference.source, reference.extractor, reference.n],
        chunk_images=args.chunk_images,
        grid_samples=args.grid_samples,
    )
    provenance = {
        "ar_model": {"path": str(args.ar_model), "sha256": ar_sha256, "num_classes": num_classes},
        "model": {"path": str(args.model), "sha256": model_sha256, "image_size": R},
        "data": {"num_samples": args.num_samples, "labels": "sample i has class i % num_classes"},
        "seeds": {
            "seed": args.seed,
            "ar_tokens": "per (group of --gen-batch samples, k): torch.Generator seeded by sha256('ar'|seed|group|k)",
            "decoder_noise": "per (sample key, k): torch.Generator seeded by sha256(seed|key|k)",
        },
        "settings": {
            "ks": list(ks),
            **asdict(sampling),
            **asdict(settings),
            "gen_batch": args.gen_batch,
            "chunk_images": args.chunk_images,
            "feature_subset": args.feature_subset,
        },
        "inception": {"identity": identity, "weights": str(weights), "classifier": has_classifier},
        "versions": versions(),
    }
    name = Path(str(args.ar_model).rstrip("/")).name
    lengths_url = join(str(args.output), "partial", "lengths") if ar_cfg.eos else None
    provenance["ar_model"]["eos"] = ar_cfg.eos
    spec = SweepSpec(
        name="eval_generate",
        output=str(args.output),
        ks=ks,
        fingerprint=fingerprint,
        stage=G.GenerateStage,
        stage_kwargs=dict(
            ar=local_or_hub(args.ar_model),
            model=local_or_hub(args.model),
            ks=ks,
            sampling=asdict(sampling),
            settings=asdict(settings),
            num_classes=num_classes,
            grid_keys=grid_keys,
            device=res.device,
            threads=res.threads,
            lengths_url=lengths_url,
        ),
        model_resources=res,
        inception_weights=str(weights),
        inception_resources=inception_res,
        chunk_images=args.chunk_images,
        metrics=metric_options(args),
        reference=reference,
        report=Report(
            provenance=provenance,
            run={},
            grid_keys=grid_keys,
            grid_file="samples_grid.png",
            with_original=False,
            metric_name="gFID",
            title=f"{name}: {{n}} samples per k, AR cfg {args.cfg_scale}, decoder {args.timesteps} steps",
        ),
    )

    def rows(done: frozenset[str]):
        """One row per group of --gen-batch samples with a sample not yet done; None when all are."""
        import ray

        groups = [
            g
            for g in G.sample_groups(args.num_samples, args.gen_batch)
            if any(G.sample_key(i) not in done for i in range(g["start"], g["start"] + g["count"]))
        ]
        progress(f"[eval_generate] {args.num_samples} samples x k={list(ks)}: {len(groups)} groups to generate")
        return ray.data.from_items(groups, override_num_blocks=len(groups)) if groups else None

    outcome = sweep(spec, rows)
    summary = {"files": outcome.files, "per_k": outcome.results["per_k"], "work": outcome.results["work"]}
    if lengths_url is not None:
        lengths = G.length_summary(lengths_url, G.sample_groups(args.num_samples, args.gen_batch), ks)
        add_length_summary(str(args.output), lengths)
        summary["length_summary"] = lengths
    print_result(summary)
    return 0


def sweep(spec, rows):
    """pipeline.eval.sweep_run.run_sweep with its errors as one line each."""
    from pipeline.eval.sweep_results import ResumeMismatchError
    from pipeline.eval.sweep_run import NothingToScoreError, run_sweep

    try:
        return run_sweep(spec, rows, progress)
    except ResumeMismatchError as e:
        fail(f"--output: {e}")
    except NothingToScoreError as e:
        fail(f"--ar-model: {e}")


def add_length_summary(output: str, lengths: dict) -> None:
    """Generated lengths (EOS models) into the sweep's results.json and results.md."""
    import json

    from pipeline.data.corpus import join, output_fs
    from pipeline.eval.generate import length_table

    fs, root = output_fs(output)
    path = join(root, "results.json")
    doc = json.loads(fs.cat_file(path))
    doc["length_summary"] = lengths
    fs.pipe_file(path + ".tmp", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    fs.mv(path + ".tmp", path)
    table = fs.cat_file(join(root, "results.md")).decode()
    heading = f"Generated lengths ({lengths['samples']} samples; EOS ends a sample, k is the most it may take):"
    fs.pipe_file(join(root, "results.md"), f"{table}\n{heading}\n\n{length_table(lengths)}\n".encode())


if __name__ == "__main__":
    raise SystemExit(run_main(main))
