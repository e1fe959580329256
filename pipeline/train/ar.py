"""AR training: next-token cross-entropy of `flextok.ar.ARModel` over the Parquet token corpus, streamed
to the workers through Ray Data.

    ds = read_corpus("corpus/", k=128)                               # pipeline.data.corpus
    task = ARTask(model=ar_preset("d12", max_tokens=128).to_dict())
    run_training(task, LoopConfig(...), ds, Scaling(8, gpus_per_worker=1), Run("s3://bucket/runs/ar-d12"))

Rows without a label train the null class (the unconditional model that CFG uses). Rows of an adaptive corpus
differ in length: a batch is zero-padded to its longest row and the loss masks the padding; the objective
reports the share of padded slots as `pad_fraction` (a metric in metrics.jsonl / TensorBoard).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import Tensor, nn

from flextok.ar import ARConfig, ARModel

from .common import LoopConfig
from .loop import TrainTask


class ARObjective(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.model = ARModel(cfg)

    def forward(
        self, labels: Tensor, tokens: Tensor, lengths: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        loss = self.model.loss(labels, tokens, lengths, generator=generator)
        return {"loss": loss, "pad_fraction": padding_fraction(lengths, tokens.shape[1])}


def padding_fraction(lengths: Tensor, width: int) -> float:
    """Share of the slots of a padded batch [B, width] that hold no token (rows of `lengths` [B] tokens)."""
    return 1.0 - float(lengths.sum()) / (len(lengths) * width) if len(lengths) and width else 0.0


def expected_padding_fraction(histogram: dict[int, int], batch: int) -> float:
    """Share of padded slots over many batches of `batch` rows drawn at random from a corpus with
    `histogram` {length: rows}, each batch padded to its longest row: 1 - mean length / E[longest], where
    P(longest <= n) = F(n)^batch (F: the share of rows of length <= n)."""
    ns = np.array(sorted(histogram), dtype=np.float64)
    share = np.array([histogram[n] for n in sorted(histogram)], dtype=np.float64) / sum(histogram.values())
    below = np.cumsum(share) ** batch  # P(longest <= n)
    longest = float((ns * np.diff(below, prepend=0.0)).sum())  # E[longest]
    return 1.0 - float((ns * share).sum()) / longest


class TokenCollate(ArrowBatchCollateFn):
    """Corpus rows -> {"labels" [B], "tokens" [B, T] (zero-padded), "lengths" [B]} (int64).

    Null labels become `null_class`; labels outside 0..null_class-1 are an error naming the row's key."""

    def __init__(self, null_class: int, max_tokens: int):
        super().__init__()
        self.null_class, self.max_tokens = null_class, max_tokens

    def __call__(self, batch: pa.Table) -> dict[str, Tensor]:
        column = batch.column("tokens").combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        T = int(lengths.max())
        if self.max_tokens < T:
            raise ValueError(f"corpus rows hold {T} tokens, the model's max_tokens is {self.max_tokens} (set k)")
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
        if (lengths == T).all():
            tokens = flat.reshape(len(lengths), T)  # [B, T], the usual case
        else:
            tokens = np.zeros((len(lengths), T), np.int64)
            rows = np.repeat(np.arange(len(lengths)), lengths)
            cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            tokens[rows, cols] = flat
        labels = batch.column("label").to_numpy(zero_copy_only=False)  # float with NaN where null
        null = np.isnan(labels)
        bad = ~null & ((labels < 0) | (labels >= self.null_class))  # class ids are 0..num_classes-1
        labels = np.where(null, self.null_class, labels).astype(np.int64)
        if bad.any():
            key = batch.column("key")[int(np.argmax(bad))].as_py()
            raise ValueError(
                f"corpus row '{key}' has label {labels[bad][0]}; the model has {self.null_class} classes (num-classes)"
            )
        return {
            "labels": torch.from_numpy(labels),
            "tokens": torch.from_numpy(tokens),
            "lengths": torch.from_numpy(lengths),
        }


@dataclass
class ARTask(TrainTask):
    model: dict[str, Any]  # ARConfig.to_dict()

    unit = "tokens"

    @property
    def config(self) -> ARConfig:
        return ARConfig.from_dict(self.model)

    def build(self) -> nn.Module:
        return ARObjective(self.config)

    def new_model(self) -> ARModel:
        return ARModel(self.config)

    def batches(self, shard: Any, epoch: int, micro_batch: int, cfg: LoopConfig) -> Iterator[dict[str, Tensor]]:
        return shard.iter_torch_batches(
            batch_size=micro_batch,
            drop_last=True,
            collate_fn=TokenCollate(self.config.num_classes, self.config.max_tokens),
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch if cfg.shuffle_buffer else None,
        )

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["lengths"].sum())


# Corpora whose training columns take at most this many bytes are read once, into the object store.
MATERIALIZE_BYTES = 512 * 2**20


def corpus_for_training(path: str, k: int | None = None, materialize_bytes: int = MATERIALIZE_BYTES) -> Any:
    """The corpus's Ray Dataset with only what training reads (tokens truncated to k).

    Every epoch is a new Ray Data execution; over Parquet files that is a new read, whose start-up the workers
    wait for (a few hundred rows take a few steps per epoch; issue 12 saw the AR job wait for data 25-50% of
    its time). A corpus of at most `materialize_bytes` (uint16 tokens + label + key, estimated from its
    markers) is therefore read once and materialized: later epochs stream its blocks from the object store."""
    from ..data.corpus import corpus_files, output_fs, read_corpus, read_markers

    ds = read_corpus(path, k=k).select_columns(["key", "label", "tokens"])
    _, _, meta = corpus_files(path)
    rows = sum(m["written"] for m in read_markers(*output_fs(path)).values())
    if rows * (2 * (k or meta.num_tokens) + 32) <= materialize_bytes:
        ds = ds.materialize()
    return ds
