"""Train the class-conditional AR model on a FlexTok token corpus on Ray Train; the Parquet corpus is
streamed to the workers through Ray Data.

    python jobs/train_ar.py --config configs/train_ar_tiny.yaml --corpus corpus/ --output runs/ar-tiny
    python jobs/train_ar.py --config configs/train_ar_d30.yaml --corpus s3://bucket/corpus --output s3://bucket/runs/ar
    (run the same command again to resume a stopped or failed run from its latest checkpoint)

Checkpoints: OUTPUT/checkpoint_<step>/{model,ema} load with `flextok.ar.ARModel.from_pretrained`.
Details: docs/training.md.
"""

from __future__ import annotations

import argparse

from jobs.common import fail, parse_args, run_main
from jobs.training import add_training_args, check_required, finish, loop_config, resource_plan, scaling_and_run

__all__ = ["build_parser", "main", "resource_plan"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_ar", description="Train the class-conditional AR model on Ray Train.")
    data = p.add_argument_group("data")
    data.add_argument("--corpus", help="token corpus folder or URL, written by the pretokenize job (required)")
    data.add_argument("--k", type=int, help="train on the first k tokens of each sequence (default: all stored)")

    model = p.add_argument_group("model")
    model.add_argument("--preset", default="tiny", help="AR size: tiny | small | d10 | d12 | d16 | d20 | d24 | d30")
    model.add_argument("--num-classes", type=int, default=1000, help="class labels 0..N-1 (default 1000)")
    model.add_argument("--class-dropout-prob", type=float, default=0.1, help="label -> null class, for CFG (0.1)")
    model.add_argument(
        "--eos",
        choices=["auto", "on", "off"],
        default="auto",
        help="end-of-sequence token: auto = on for an adaptive corpus (rows of different lengths), off otherwise",
    )
    add_training_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    check_required(args, "corpus", "output")
    loop = loop_config(args)

    from flextok.ar import ar_preset
    from pipeline.data.corpus import corpus_files
    from pipeline.train.ar import ARTask, corpus_for_training
    from pipeline.train.loop import run_training

    try:
        _, _, meta = corpus_files(args.corpus)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--corpus {args.corpus}: {e}")
    k = args.k or meta.num_tokens
    if not 1 <= k <= meta.num_tokens:
        fail(f"--k {k}: the corpus stores {meta.num_tokens} tokens per sequence")
    eos = use_eos(args.eos, meta.adaptive)
    try:
        cfg = ar_preset(
            args.preset,
            vocab_size=meta.codebook_size,
            max_tokens=k,
            num_classes=args.num_classes,
            class_dropout_prob=args.class_dropout_prob,
            eos=eos,
        )
    except ValueError as e:
        fail(str(e))
    scaling, run = scaling_and_run(args)  # starts or joins Ray: after every check of the arguments
    dataset = corpus_for_training(args.corpus, k)
    print(
        f"training AR '{args.preset}' on {args.corpus} (k={k}, tokenizer {meta.tokenizer}) for {loop.steps} steps "
        f"on {scaling.workers} worker(s) -> {args.output}",
        flush=True,
    )
    lengths = "adaptive corpus: rows of their own lengths" if meta.adaptive else f"every row {k} tokens"
    print(f"{lengths}; end-of-sequence token {'on' if eos else 'off'} (--eos {args.eos})", flush=True)
    if meta.adaptive:
        print(f"padding: {expected_padding(args.corpus, k, loop.micro_batch(scaling.workers or 1))}", flush=True)
    result = run_training(ARTask(model=cfg.to_dict()), loop, dataset, scaling, run)
    return finish(result, args.export, "ARModel.from_pretrained")


def use_eos(flag: str, adaptive: bool) -> bool:
    """--eos auto: an end-of-sequence token exactly when the corpus's rows differ in length."""
    return adaptive if flag == "auto" else flag == "on"


def expected_padding(corpus: str, k: int, micro_batch: int) -> str:
    """The corpus's rows per length (from its unit markers) and the padding fraction batches of `micro_batch`
    random rows would have (the run logs the measured one as `pad_fraction`)."""
    from pipeline.data.corpus import merge_adaptive_stats, output_fs, read_markers
    from pipeline.train.ar import expected_padding_fraction

    markers = read_markers(*output_fs(corpus)).values()
    hist: dict[int, int] = {}
    for n, rows in merge_adaptive_stats([m.get("adaptive", {}) for m in markers])["k_histogram"].items():
        hist[min(int(n), k)] = hist.get(min(int(n), k), 0) + rows
    fraction = expected_padding_fraction(hist, micro_batch)
    return (
        f"rows per length {dict(sorted(hist.items()))}, expected padding fraction {fraction:.3f} (batch {micro_batch})"
    )


if __name__ == "__main__":
    raise SystemExit(run_main(main))
