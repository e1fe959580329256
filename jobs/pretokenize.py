"""Pretokenize images into a FlexTok token corpus (Parquet) on Ray Data; reruns resume.

    python jobs/pretokenize.py --model ckpt/ --input 'shards/train-*.tar' --output corpus/ --batch-size 64
    python jobs/pretokenize.py --config configs/pretokenize.yaml --num-tokens 16

Inputs: webdataset .tar shards, .parquet files with image bytes, image folders (+ labels CSV); any fsspec URL.
Output layout and columns: docs/pretokenize.md. Run `python jobs/validate_corpus.py OUTPUT` afterwards.
"""

from __future__ import annotations

import argparse

from jobs.common import fail, parse_args, run_main, user_message
from jobs.resources import (
    Cluster,
    Plan,
    actor_stage_plan,
    add_worker_args,
    check_args,
    cluster_now,
    init_ray,
    threads,
    warn_if_short,
)


class ReplaceDefaultAppend(argparse.Action):
    """Repeatable option whose command-line values replace (not extend) a default from --config."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_given_" + self.dest, False)
        items = list(getattr(namespace, self.dest) or []) if seen else []
        setattr(namespace, self.dest, items + [values])
        setattr(namespace, "_given_" + self.dest, True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretokenize", description="Images -> FlexTok token corpus (Parquet) on Ray Data; reruns resume."
    )
    p.add_argument("--model", help="FlexTok checkpoint folder or hub id (required)")
    p.add_argument(
        "--input", action=ReplaceDefaultAppend, type=str, help="input URL or glob, repeatable (.tar, .parquet, folder)"
    )
    p.add_argument("--output", help="output folder URL (required)")
    p.add_argument("--resolution", type=int, help="image size (default and only allowed value: the model's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per tokenize call (default 64)")
    p.add_argument("--torch-threads", type=int, help="torch threads per actor on CPU (default: --cpus-per-worker)")
    p.add_argument("--num-tokens", type=int, help="store each sequence's first K tokens (default: all)")
    p.add_argument(
        "--augment",
        default="none",
        choices=["none", "random-flip", "flip", "tencrop"],
        help="augmentation copies per image, recorded in the `aug` column (default none)",
    )
    p.add_argument("--labels", help="labels CSV for folder inputs (default: the folder's labels.csv)")
    p.add_argument("--rows-per-file", type=int, default=100_000, help="max rows per data file (default 100000)")
    p.add_argument("--folder-chunk", type=int, default=1000, help="images per unit of work for folders (default 1000)")
    p.add_argument(
        "--adaptive",
        help="psnr:TARGET (dB) | inception:TARGET (cosine distance): store each image's shortest prefix on the "
        "ladder whose reconstruction meets the target; psnr-slope:LAMBDA (dB per token): the prefix after which "
        "more tokens gain less than LAMBDA dB each (docs/adaptive.md)",
    )
    p.add_argument("--ladder", help="adaptive: the k's to choose from, e.g. 1,2,4,8 (default: powers of two)")
    p.add_argument("--adaptive-timesteps", type=int, default=25, help="adaptive: decoder steps (default 25)")
    p.add_argument("--adaptive-guidance-scale", type=float, default=1.0, help="adaptive: guidance (default 1)")
    p.add_argument(
        "--length-predictor",
        help="adaptive: a length predictor folder (flextok train length-predictor): k from its predicted PSNR "
        "curve, no decoder call; --adaptive psnr:TARGET or psnr-slope:LAMBDA",
    )
    add_worker_args(p, "tokenizer actors")
    return p


def resource_plan(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """Tokenizer actors fed by decoding tasks."""
    return actor_stage_plan("tokenize", args, cluster)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    for name in ("model", "input", "output"):
        if not getattr(args, name):
            fail(f"--{name} is required")
    if problem := check_args(args):
        fail(problem)
    from flextok.errors import SettingError
    from pipeline.data.pretokenize import PretokenizeConfig, run_pretokenize, tokenizer_meta
    from pipeline.data.sources import InputError

    cfg = PretokenizeConfig(
        model=args.model,
        inputs=list(args.input),
        output=args.output,
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_tokens=args.num_tokens,
        augment=args.augment,
        labels=args.labels,
        rows_per_file=args.rows_per_file,
        folder_chunk=args.folder_chunk,
        adaptive=args.adaptive,
        ladder=args.ladder,
        adaptive_timesteps=args.adaptive_timesteps,
        adaptive_guidance_scale=args.adaptive_guidance_scale,
        length_predictor=args.length_predictor,
    )
    try:
        meta = tokenizer_meta(cfg)  # the model's files checked before Ray starts
    except SettingError as e:
        fail(user_message(e))
    except (OSError, ValueError) as e:
        fail(f"--model {args.model}: {e}")
    init_ray()
    cluster = cluster_now()
    plan = resource_plan(args, cluster)
    warn_if_short(plan, cluster, "pretokenize")
    tokenize = plan.stage("tokenize")
    cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker = tokenize.workers, tokenize.gpus, tokenize.cpus
    cfg.torch_threads = threads(tokenize, args.torch_threads)
    try:
        summary = run_pretokenize(cfg, meta=meta)
    except (SettingError, InputError) as e:
        fail(user_message(e))
    except FileNotFoundError as e:
        fail(f"not found: {e}")
    totals = summary.manifest.get("totals", {})
    print(
        f"pretokenize: {summary.committed} shard(s) committed now, {summary.skipped} already done; corpus holds "
        f"{totals.get('written', '?')} rows from {totals.get('read', '?')} records, {totals.get('failed', '?')} "
        f"bad records in _errors.parquet ({summary.seconds:.1f} s) -> {args.output}"
    )
    adaptive = summary.manifest.get("adaptive")
    if adaptive:
        print(
            f"adaptive {args.adaptive}: mean {adaptive['mean_tokens']:.2f} tokens per row, k histogram "
            f"{adaptive['k_histogram']}, {adaptive['missed']} missed the target, {adaptive['decodes']} decoder calls"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
