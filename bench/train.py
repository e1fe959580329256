"""Training throughput, side by side in one run: the same tiny model and batches trained

  (a) by a plain single-process PyTorch loop (batches from memory, all CPU threads), and
  (b) by TorchTrainer with N workers (DDP, data streamed by Ray Data), the same global batch;

prints steps/s of both and the ratio (b)/(a). For the AR task it also measures the corpus loaders'
tokens/s (Ray Data `read_corpus` + collate, and `CorpusDataset` + DataLoader) next to the tokens/s the
AR training consumes.

    python bench/train.py                        # AR, 2 workers, 40 steps
    python bench/train.py --task tokenizer --steps 30
    python bench/train.py --rows 256 --steps 40 --compare-unmaterialized   # a small corpus: many epochs

Both loops run the same `pipeline.train.loop.train_step` (objective, AdamW, schedule, clipping, EMA) and the
same malloc settings (pipeline.malloc). The Ray Train figure is the run's own steps/s over its metric windows
(data waits included); its compute fraction is the time spent inside train_step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.train.common import LoopConfig, make_optimizer, read_metrics  # noqa: E402


def write_corpus(folder: str, rows: int, k: int, seed: int = 0) -> None:
    """A synthetic corpus: Zipf-distributed tokens (a few thousand distinct ids), random labels."""
    from pipeline.data.corpus import CorpusMeta, tokens_table, write_table_corpus

    rng = np.random.default_rng(seed)
    tokens = np.minimum(rng.zipf(1.3, size=(rows, k)) - 1, 63999)
    labels = rng.integers(0, 1000, rows).tolist()
    meta = CorpusMeta("bench", "0" * 64, 64000, k, k, 32, "none", "synthetic")
    table = tokens_table([f"{i:06d}" for i in range(rows)], labels, tokens, ["bench"] * rows, [0] * rows)
    write_table_corpus(folder, {"bench": table}, meta, rows_per_file=rows)


def plain_loop(task, batches: list[dict], cfg: LoopConfig, warmup: int) -> float:
    """Steps/s of a single-process loop after `warmup` steps: the same `train_step` (objective, AdamW,
    schedule, clipping, EMA) as the Ray Train workers, on batches held in memory."""
    from pipeline.train.common import EMA
    from pipeline.train.loop import MODEL_PREFIX, train_step

    torch.manual_seed(cfg.seed)
    model = task.build()
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay, prefix=MODEL_PREFIX)
    start = None
    for step in range(cfg.steps):
        if step == warmup:
            start = time.perf_counter()
        train_step(model, optimizer, ema, task, [batches[step % len(batches)]], step, 0, torch.device("cpu"), cfg)
    return (cfg.steps - warmup) / (time.perf_counter() - start)


def trainer_steps_per_s(
    task, cfg: LoopConfig, dataset, workers: int, storage: str, cpus: float | None = None
) -> tuple[float, float, float]:
    """(steady steps/s and compute fraction from the run's metrics, skipping the first window; wall seconds
    including start-up)."""
    from pipeline.train.loop import Run, Scaling, run_training

    start = time.perf_counter()
    result = run_training(
        task,
        cfg,
        dataset,
        Scaling(workers, cpus_per_worker=cpus or min(1.0, (os.cpu_count() or 2) / (2 * workers))),
        Run(os.path.join(storage, "bench"), max_failures=0),
    )
    wall = time.perf_counter() - start
    if result.error:
        raise result.error
    windows = read_metrics(os.path.join(storage, "bench", "tensorboard"))[1:]
    steps_per_s = float(np.mean([w["steps_per_s"] for w in windows]))
    return steps_per_s, float(np.mean([w["compute_fraction"] for w in windows])), wall


def loader_tokens_per_s(corpus: str, batch: int, null_class: int, k: int, passes: int) -> tuple[float, float]:
    """(Ray Data read_corpus + TokenCollate, CorpusDataset + DataLoader) tokens/s over full passes."""
    from torch.utils.data import DataLoader

    from pipeline.data.corpus import CorpusDataset
    from pipeline.train.ar import TokenCollate, corpus_for_training

    ds = corpus_for_training(corpus, materialize_bytes=2**40)
    n = 0
    start = time.perf_counter()
    for _ in range(passes):
        for b in ds.iter_torch_batches(batch_size=batch, collate_fn=TokenCollate(null_class, k)):
            n += int(b["lengths"].sum())
    ray_rate = n / (time.perf_counter() - start)
    n = 0
    start = time.perf_counter()
    for _ in range(passes):
        for tokens, _labels in DataLoader(CorpusDataset(corpus), batch_size=batch):
            n += tokens.numel()
    return ray_rate, n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["ar", "tokenizer"], default="ar")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="plain loop: steps not timed")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="Ray CPUs per train worker (Ray sets its torch threads to match); "
        "default: half the machine's CPUs over the workers, at most 1",
    )
    p.add_argument("--rows", type=int, default=2048, help="AR corpus rows / tokenizer images")
    p.add_argument(
        "--materialize-bytes", type=int, help="AR: corpus_for_training's threshold (default: the job's; 0: never)"
    )
    p.add_argument("--compare-unmaterialized", action="store_true", help="AR: also train on the lazy corpus")
    p.add_argument("--ema-decay", type=float, default=LoopConfig.ema_decay, help="EMA decay, both loops")
    args = p.parse_args()
    from pipeline.malloc import runtime_env, tune_this_process

    tune_this_process()  # the plain loop runs here; the Ray workers get the same malloc through runtime_env

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from bench.scale import init_ray

    init_ray(runtime_env(), num_cpus=os.cpu_count() or 1)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = LoopConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        log_every=5,
        checkpoint_every=10**9,
        shuffle_buffer=0,
        ema_decay=args.ema_decay,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.task == "ar":
            from flextok.ar import ar_preset
            from pipeline.train.ar import ARTask, TokenCollate, corpus_for_training

            k = 32
            write_corpus(f"{tmp}/corpus", args.rows, k)
            task = ARTask(model=ar_preset("tiny", max_tokens=k).to_dict())
            threshold = {} if args.materialize_bytes is None else {"materialize_bytes": args.materialize_bytes}
            dataset = corpus_for_training(f"{tmp}/corpus", **threshold)  # as the job builds it
            collate = TokenCollate(1000, k)
            batches = [collate(b) for b in dataset.iter_batches(batch_size=args.batch_size, batch_format="pyarrow")]
        else:
            from flextok import preset
            from pipeline.data.preprocess import to_model_input
            from pipeline.train.tokenizer import TokenizerTask

            images = np.random.default_rng(0).integers(0, 256, (args.rows, 32, 32, 3), dtype=np.uint8)
            task = TokenizerTask(model=preset("tiny").to_dict(), hflip=False)
            dataset = ray.data.from_numpy(images).rename_columns({"data": "image"}).materialize()
            batches = [
                {"images": to_model_input(images[i : i + args.batch_size])}
                for i in range(0, args.rows - args.batch_size + 1, args.batch_size)
            ]

        torch.set_num_threads(os.cpu_count() or 1)
        plain_before = plain_loop(task, batches, cfg, args.warmup)
        trainer, compute, wall = trainer_steps_per_s(
            task, cfg, dataset, args.workers, f"{tmp}/runs", args.cpus_per_worker
        )
        if args.task == "ar" and args.compare_unmaterialized:  # the job before corpus_for_training materialized
            lazy = corpus_for_training(f"{tmp}/corpus", materialize_bytes=0)
            lazy_rate, lazy_compute, _ = trainer_steps_per_s(
                task, cfg, lazy, args.workers, f"{tmp}/runs-lazy", args.cpus_per_worker
            )
        torch.set_num_threads(os.cpu_count() or 1)
        plain_after = plain_loop(task, batches, cfg, args.warmup)  # again: other load on the machine drifts
        plain = (plain_before + plain_after) / 2
        unit = "tokens" if args.task == "ar" else "images"
        per_step = args.batch_size * (k if args.task == "ar" else 1)
        print(f"task {args.task}, global batch {args.batch_size}, {args.steps} steps, {os.cpu_count()} CPUs")
        print(
            f"  plain single-process loop      {plain:8.2f} steps/s  ({plain * per_step:9.0f} {unit}/s; mean of "
            f"{plain_before:.2f} before and {plain_after:.2f} after the trainer)"
        )
        print(
            f"  TorchTrainer, {args.workers} workers (DDP)  {trainer:8.2f} steps/s  ({trainer * per_step:9.0f} "
            f"{unit}/s; {wall:.0f} s wall incl. start-up)"
        )
        print(f"  ratio TorchTrainer / plain     {trainer / plain:8.2f}")
        print(f"  TorchTrainer compute fraction  {compute:8.2f}  (time in train_step; the rest waits for data)")
        if args.task == "ar" and args.compare_unmaterialized:
            print(
                f"  same, corpus not materialized  {lazy_rate:8.2f} steps/s  (ratio {lazy_rate / plain:.2f}, compute "
                f"fraction {lazy_compute:.2f}: every epoch a new Parquet read)"
            )
        print(f"  load average {os.getloadavg()}")
        if args.task == "ar":
            ray_rate, torch_rate = loader_tokens_per_s(f"{tmp}/corpus", args.batch_size, 1000, k, passes=3)
            consumed = trainer * per_step
            print(
                f"  corpus loader, Ray Data        {ray_rate:9.0f} tokens/s ({ray_rate / consumed:.0f}x the training's)"
            )
            print(f"  corpus loader, CorpusDataset   {torch_rate:9.0f} tokens/s ({torch_rate / consumed:.0f}x)")
            print(f"  AR training consumes           {consumed:9.0f} tokens/s")
    ray.shutdown()


if __name__ == "__main__":
    main()
