"""Pretokenization: the Ray Data job vs a bare PyTorch loop on the same images, and bytes per token.

    .venv/bin/python bench/pretokenize.py                 # d12_d12 at 256x256 on CPU, 16 images
    .venv/bin/python bench/pretokenize.py --images 64 --batch-size 16

Throughput: the same images (ImageNet sample, as webdataset shards) are tokenized (a) by the job on the local
Ray cluster (decode in tasks, one tokenizer actor holding the model, commits on the driver) and (b) by a bare
loop calling `model.tokenize` on pre-decoded batches (run before and after the job, since other load on the
machine drifts), both with all cores' torch threads. Rates are per batch, leaving out the first batch of each
(warm-up): for the loop the call itself, for the job the time between the actor finishing one batch and the
next, which also counts any wait for decoded input. Median and best batch are printed (the best is the
least disturbed by other load), and the job's rates with the driver and with start-up beside them.

Size: bytes on disk per token of a whole output folder (data, markers, manifest, errors) at 256 tokens per
image, next to one .npy file per image (int64, as peers store codes; uint16 for reference). Real tokens: the
job with a `tiny` model of 256 registers over the 250 sample images with ten-crop augmentation (2,500 rows,
one input shard); uniform-random tokens: the same rows with their tokens replaced by uniform draws.
Random weights throughout: speed does not depend on them, and trained tokens are close to uniform.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flextok import FlexTok, preset  # noqa: E402
from flextok.config import tiny  # noqa: E402
from pipeline.data.corpus import SCHEMA, output_fs, read_markers, tokens_table, write_table_corpus  # noqa: E402
from pipeline.data.preprocess import center_crop_adm, decode_image, to_model_input  # noqa: E402
from pipeline.data.pretokenize import PretokenizeConfig, TokenizeActor, run_pretokenize, tokenizer_meta  # noqa: E402

SAMPLE = Path(os.environ.get("FLEXTOK_SHARED", REPO.parent / "shared")) / "data" / "imagenet-sample"


def write_shards(files: list[Path], folder: Path, per_shard: int) -> list[Path]:
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(0, len(files), per_shard):
        path = folder / f"bench-{i // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for f in files[i : i + per_shard]:
                tar.add(f, arcname=f"{f.stem}.jpg")
        shards.append(path)
    return shards


def bare_loop(model: FlexTok, files: list[Path], resolution: int, batch_size: int) -> list[float]:
    """Images/s of each model.tokenize call on pre-decoded batches (the first, warm-up, left out)."""
    crops = np.stack([center_crop_adm(decode_image(f.read_bytes()), resolution) for f in files])  # [N, R, R, 3]
    batches = [to_model_input(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
    model.tokenize(batches[0])
    rates = []
    for x in batches[1:]:
        start = time.perf_counter()
        model.tokenize(x)
        rates.append(len(x) / (time.perf_counter() - start))
    return rates


class TimedTokenizeActor(TokenizeActor):
    """The job's actor, also appending the unix time at which each tokenize call ends to `log_path`."""

    log_path = ""

    def tokenize(self, images: np.ndarray) -> np.ndarray:
        tokens = super().tokenize(images)
        with open(self.log_path, "a") as f:
            f.write(f"{time.time()} {len(images)}\n")
        return tokens


def job_rates(cfg: PretokenizeConfig, log_path: Path) -> tuple[list[float], float, float]:
    """The job's (images/s per batch, steady images/s, end-to-end images/s).

    Per batch: images over the time since the actor finished the previous batch (model time plus any wait for
    decoded input). Steady: images after the first batch over the time from its end to the driver holding the
    last tokens (transfers and the commit included). End to end: with Ray Data start-up and model loading."""
    actor = type("TimedTokenizeActor", (TimedTokenizeActor,), {"log_path": str(log_path)})
    summary = run_pretokenize(cfg, log=lambda line: None, actor_cls=actor)
    calls = [(float(t), int(n)) for t, n in (line.split() for line in log_path.read_text().splitlines())]
    per_batch = [n / (t - t_prev) for (t_prev, _), (t, n) in zip(calls, calls[1:], strict=False)]
    last_arrival = max(t for t, n in summary.arrivals if n)
    steady = (summary.rows - calls[0][1]) / (last_arrival - calls[0][0])
    return per_batch, steady, summary.rows / summary.seconds


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def npy_bytes_per_token(tokens: np.ndarray, dtype, folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(tokens):
        np.save(folder / f"{i:06d}.npy", row.astype(dtype))
    return folder_bytes(folder) / tokens.size


def size_table(work: Path, threads: int) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    model = FlexTok(tiny(image_size=32, num_registers=256)).eval()
    with torch.no_grad():  # as the tests' tiny model: noise so that tokens vary with the image
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.encoder.to_latents.weight.mul_(10.0)
    model.save_pretrained(work / "tiny256")
    out = work / "real"
    cfg = PretokenizeConfig(
        model=str(work / "tiny256"), inputs=[str(SAMPLE)], output=str(out), augment="tencrop", torch_threads=threads
    )
    run_pretokenize(cfg, log=lambda line: None)
    table = pq.read_table(out / "data", schema=SCHEMA)
    tokens = np.array(table.column("tokens").to_pylist())  # [rows, 256]
    real = folder_bytes(out) / tokens.size

    # The same rows with uniform tokens, committed the way the job commits them.
    rng = np.random.default_rng(0)
    uniform = work / "uniform"
    unit = read_markers(*output_fs(str(out))).popitem()[0]
    columns = [table.column(name) for name in ("key", "label", "source", "aug")]
    random_table = tokens_table(*columns[:2], rng.integers(0, 64000, size=tokens.shape), *columns[2:])
    write_table_corpus(str(uniform), {unit: random_table}, tokenizer_meta(cfg), cfg.rows_per_file)
    return [
        (f"Parquet corpus, real tokens ({tokens.shape[0]} rows x 256)", real),
        (f"Parquet corpus, uniform-random tokens ({tokens.shape[0]} rows x 256)", folder_bytes(uniform) / tokens.size),
        ("one .npy per image, int64 (real tokens)", npy_bytes_per_token(tokens, np.int64, work / "npy64")),
        ("one .npy per image, uint16 (real tokens)", npy_bytes_per_token(tokens, np.uint16, work / "npy16")),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="d12_d12")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    torch.set_num_threads(args.threads)
    files = sorted(SAMPLE.glob("*.JPEG"))[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = FlexTok(preset(args.preset)).eval()
        R = model.cfg.image_size
        model.save_pretrained(work / "model")
        bare = bare_loop(model, files, R, args.batch_size)
        ray.init(include_dashboard=False, log_to_driver=False)
        cfg = PretokenizeConfig(
            model=str(work / "model"),
            inputs=[str(s) for s in write_shards(files, work / "shards", len(files))],  # one shard: full batches
            output=str(work / "out"),
            batch_size=args.batch_size,
            workers=1,
            torch_threads=args.threads,
        )
        job, steady, end_to_end = job_rates(cfg, work / "calls.txt")
        bare += bare_loop(model, files, R, args.batch_size)  # again after the job: other load on the machine drifts
        del model
        sizes = size_table(work, args.threads)
        ray.shutdown()

    print(f"\n{args.preset} encoder at {R}x{R}, {args.images} images, batch {args.batch_size}, {args.threads} threads")
    print(f"{'images/s':52s} {'median':>8s} {'best':>8s}   batches")
    print(
        f"{'bare loop: model.tokenize on pre-decoded batches':52s} {median(bare):8.3f} {max(bare):8.3f}   {len(bare)}"
    )
    print(f"{'job on Ray Data: tokenizer actor, batch to batch':52s} {median(job):8.3f} {max(job):8.3f}   {len(job)}")
    print(f"{'ratio job / bare loop':52s} {median(job) / median(bare):8.3f} {max(job) / max(bare):8.3f}")
    print(f"job, first batch's end -> last tokens at the driver: {steady:.3f} images/s")
    print(f"job, end to end with Ray Data start-up and model loading: {end_to_end:.3f} images/s")
    print(f"\n{'layout (all files on disk)':60s} {'bytes/token':>11s}")
    for name, value in sizes:
        print(f"{name:60s} {value:11.3f}")


if __name__ == "__main__":
    main()
