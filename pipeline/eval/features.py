"""Inception features on Ray Data: actors hold the network, the driver merges statistics.

    ds = image_dataset(urls, resolution)                      # pipeline.data.sources: rows key, label, image, ...
    ds = with_inception_features(ds, weights, Resources())    # + features [2048] (+ logits); image dropped
    got = collect_features(ds)                                # driver: FeatureStats merged batch by batch

Rows that carry an `error` (unreadable inputs) or `want == False` skip the network and come out with zero
features and `feature_pass == 0`; every computed row has `feature_pass == 1`, which is how jobs count work.
Evaluation runs with Ray Data's `preserve_order`, so the same inputs give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..devices import stage_device
from ..inception import FEATURE_DIM, Inception
from .fid import FeatureStats


@dataclass
class Resources:
    """One actor stage: how many workers (actors), and the CPUs/GPUs and batch size each gets."""

    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 32
    torch_threads: int | None = None  # None: the actor's whole CPUs, at least 1

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    @property
    def threads(self) -> int:
        """torch threads per actor."""
        return self.torch_threads or max(1, int(self.cpus))

    def map_kwargs(self) -> dict:
        import ray

        return dict(
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            batch_size=self.batch_size,
            batch_format="numpy",
        )


@contextmanager
def ordered_execution() -> Iterator[None]:
    """Ray Data delivers rows in input order inside (so KID subsets, chunks and grids are reproducible)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    old = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = old


def wanted_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """bool [B]: rows to run through the network (no error, and `want` when the column exists)."""
    n = len(next(iter(batch.values())))
    want = np.ones(n, bool) if "want" not in batch else batch["want"].astype(bool)
    if "error" in batch:
        want &= ~np.array([is_error(e) for e in batch["error"]], bool)
    return want


def is_error(value) -> bool:
    """An `error` cell that holds a message (null cells arrive as None, NaN or "" depending on the column)."""
    return isinstance(value, str | bytes) and len(value) > 0


class InceptionStage:
    """Ray Data actor UDF: `image` uint8 [B, R, R, 3] -> `features` float32 [B, 2048] (+ `logits` [B, 1008]
    with a classifier), `feature_pass` int8 [B]; the image column is dropped."""

    def __init__(self, weights: str, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.net = Inception(weights, device=stage_device("the Inception actor", device == "cuda"))

    @torch.no_grad()  # not a global switch: stages also run in-process (tests, local mode)
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")  # [B, R, R, 3] uint8
        want = wanted_rows(batch)
        B = len(images)
        features = np.zeros((B, FEATURE_DIM), np.float32)
        logits = np.zeros((B, 1008), np.float32) if self.net.has_classifier else None
        if want.any():
            out = self.net(np.ascontiguousarray(images[want]))
            features[want] = out["pool"].numpy()
            if logits is not None:
                logits[want] = out["logits"].numpy()
        batch["features"] = features
        if logits is not None:
            batch["logits"] = logits
        batch["feature_pass"] = want.astype(np.int8)
        return batch


def with_inception_features(ds, weights: str, res: Resources):
    """Append Inception features to every row of a Ray Dataset that has an `image` column."""
    return ds.map_batches(
        InceptionStage,
        fn_constructor_kwargs={"weights": str(weights), "device": res.device, "threads": res.threads},
        **res.map_kwargs(),
    )


@dataclass
class CollectedFeatures:
    """What the driver gathered from a feature stream."""

    stats: FeatureStats
    features: np.ndarray | None  # [n, 2048] float32, in input order (kept for KID / precision-recall)
    logits: np.ndarray | None  # [n, 1008] float32 (kept for the Inception Score, when the weights have it)
    feature_passes: int  # images that went through the network
    errors: list[dict] = field(default_factory=list)  # {key, source, error_class, error} per bad input

    @property
    def count(self) -> int:
        return self.stats.n


def collect_features(ds, keep_features: bool = False, keep_logits: bool = False) -> CollectedFeatures:
    """Driver side: fold each batch's features into merged statistics; bad rows become error entries."""
    stats = FeatureStats.empty(FEATURE_DIM)
    kept_f: list[np.ndarray] = []
    kept_l: list[np.ndarray] = []
    passes, errors = 0, []
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        ok = batch["feature_pass"].astype(bool)
        passes += int(ok.sum())
        for i in np.flatnonzero(~ok):
            if "error" in batch and is_error(batch["error"][i]):
                errors.append({c: _py(batch[c][i]) for c in ("key", "source", "error_class", "error") if c in batch})
        if ok.any():
            stats.add(batch["features"][ok])
            if keep_features:
                kept_f.append(batch["features"][ok])
            if keep_logits and "logits" in batch:
                kept_l.append(batch["logits"][ok])
    features = np.concatenate(kept_f) if kept_f else (np.zeros((0, FEATURE_DIM), np.float32) if keep_features else None)
    logits = np.concatenate(kept_l) if kept_l else None
    return CollectedFeatures(stats, features, logits, passes, errors)


def _py(x):
    return x.item() if isinstance(x, np.generic) else x
