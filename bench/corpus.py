"""Corpus readers at scale: read_corpus (the AR job's Ray Data loader) and CorpusDataset over a large corpus.

    .venv/bin/python bench/corpus.py --rows 1280000        # also run by bench/scale.py (full run)
    .venv/bin/python bench/corpus.py --rows 100000 --k 32

The corpus is written by the real writer (pipeline.data.corpus.commit_unit + write_summary) in units of 1000 rows
of k synthetic tokens; token 0 holds the row's unit and token 1 its row in the unit, so the order a reader
delivers can be compared with the stored order. Each reader makes one epoch over all rows, shuffled as in
training (read_corpus: Ray Data's local shuffle buffer of LoopConfig.shuffle_buffer rows, TokenCollate;
CorpusDataset: shuffled row groups and its 16384-row buffer, DataLoader without workers), batches of 256.

Printed per reader: start-up (to the first batch), rows/s over the epoch (start-up excluded), peak RSS of this
process above its RSS before the reader (Ray Data's read tasks run in workers and are not in it), and two
measures of shuffling:
- rank correlation (Spearman) between a row's position in the epoch and its stored position: 0 means no trace
  of the stored order, 1 the stored order itself;
- distinct units per batch of 256 (a unit = 1000 consecutive stored rows, one input shard), next to what a
  uniformly random permutation gives (~231 of 256 for 1280 units): how much a batch mixes input shards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

UNIT_ROWS = 1000
BATCH = 256


def write_synthetic_corpus(folder: Path, rows: int, k: int) -> float:
    """rows x k tokens (token 0: unit, token 1: row in unit, the rest random) by the real writer; seconds."""
    from pipeline.data.corpus import CorpusMeta, commit_unit, output_fs, tokens_table, write_summary

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    meta = CorpusMeta("bench", "0" * 64, 64000, k, k, 32, "none", "synthetic")
    fs, root = output_fs(str(folder))
    markers = {}
    for u in range(-(-rows // UNIT_ROWS)):
        n = min(UNIT_ROWS, rows - u * UNIT_ROWS)
        tokens = rng.integers(0, 64000, (n, k))
        tokens[:, 0], tokens[:, 1] = u, np.arange(n)
        name = f"unit-{u:07d}"
        keys = [f"{u:07d}-{i:04d}" for i in range(n)]
        table = tokens_table(keys, rng.integers(0, 1000, n).tolist(), tokens, [name] * n, [0] * n)
        marker = {"url": name, "kind": "folder", "index": u, "read": n, "failed": 0, "errors": []}
        markers[name] = commit_unit(fs, root, name, table, meta, 100_000, marker)
    write_summary(fs, root, markers, meta)
    return time.perf_counter() - start


def shuffle_measures(units: np.ndarray, rows: np.ndarray, num_units: int) -> tuple[float, float, float]:
    """(Spearman rank correlation of epoch position vs stored position, mean distinct units per batch,
    the same for a uniformly random permutation)."""
    stored = units.astype(np.int64) * UNIT_ROWS + rows
    ranks = np.argsort(np.argsort(stored))  # stored positions are unique: ranks are a permutation
    spearman = float(np.corrcoef(np.arange(len(ranks)), ranks)[0, 1])
    distinct = [len(np.unique(units[i : i + BATCH])) for i in range(0, len(units) - BATCH + 1, BATCH)]
    expected = num_units * (1 - (1 - 1 / num_units) ** BATCH)  # sampling rows (nearly) independently
    return spearman, float(np.mean(distinct)), expected


def read_epoch(batches, sampler) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    """(start-up seconds, rows/s after the first batch, peak RSS MiB above the start, units, rows)."""
    from bench.scale import current_rss

    base = current_rss()
    sampler.reset()
    start = time.perf_counter()
    units, rows, first = [], [], None
    for tokens in batches:
        if first is None:
            first = time.perf_counter()
        units.append(tokens[:, 0].numpy().copy())
        rows.append(tokens[:, 1].numpy().copy())
    end = time.perf_counter()
    rss, _, _ = sampler.peak()
    u, r = np.concatenate(units), np.concatenate(rows)
    return first - start, (len(u) - len(units[0])) / (end - first), (rss - base) / 2**20, u, r


def corpus_bench(rows: int, work: Path, k: int = 32) -> None:
    """Write the corpus, read it with both readers, print a table."""
    from torch.utils.data import DataLoader

    from bench.scale import Sampler
    from pipeline.data.corpus import CorpusDataset
    from pipeline.train.ar import TokenCollate, corpus_for_training
    from pipeline.train.common import LoopConfig

    folder = work / "corpus-readers"
    seconds = write_synthetic_corpus(folder, rows, k)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    mib = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print(f"\ncorpus: {rows:,} rows x {k} tokens written in {seconds:.0f} s ({rows / seconds:,.0f} rows/s): ", end="")
    print(f"{files:,} files, {mib:.0f} MiB", flush=True)
    num_units = -(-rows // UNIT_ROWS)
    sampler = Sampler()
    buffer = LoopConfig.shuffle_buffer
    ds = corpus_for_training(str(folder), k, materialize_bytes=0)  # a 1.28M-row corpus is not materialized
    ray_batches = (
        b["tokens"]
        for b in ds.iter_torch_batches(
            batch_size=BATCH, collate_fn=TokenCollate(1000, k), local_shuffle_buffer_size=buffer, local_shuffle_seed=0
        )
    )
    results = {f"read_corpus (Ray Data, shuffle buffer {buffer})": read_epoch(ray_batches, sampler)}
    start = time.perf_counter()
    dataset = CorpusDataset(str(folder), k=k, shuffle=True, seed=0)
    construct = time.perf_counter() - start
    torch_batches = (tokens for tokens, _ in DataLoader(dataset, batch_size=BATCH))
    name = f"CorpusDataset (shuffle, buffer {dataset.shuffle_buffer}) + DataLoader"
    got = read_epoch(torch_batches, sampler)
    results[name] = (got[0] + construct, *got[1:])
    print("| reader | start-up s | rows/s | peak RSS MiB above start | Spearman(position, stored) | ", end="")
    print("distinct units / batch of 256 | rows seen |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (startup, rate, rss, units, rws) in results.items():
        spearman, distinct, expected = shuffle_measures(units, rws, num_units)
        unique = len(np.unique(units.astype(np.int64) * UNIT_ROWS + rws))
        print(
            f"| {name} | {startup:.1f} | {rate:,.0f} | {rss:.0f} | {spearman:+.3f} | {distinct:.1f} (random "
            f"{expected:.0f}) | {len(units):,} ({unique:,} distinct) |",
            flush=True,
        )
    sampler.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_280_000)
    p.add_argument("--k", type=int, default=32, help="tokens per row")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from bench.scale import init_ray
    from pipeline.malloc import runtime_env

    init_ray(runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_bench(args.rows, Path(tmp), args.k)
    print(f"load average at end: {os.getloadavg()}")
    ray.shutdown()


if __name__ == "__main__":
    main()
