"""Adaptive token budgets in the reconstruction sweep: rate against quality at no extra decoder call.

    plan = AdaptivePlan(parse_targets("psnr:14,psnr:16"), ladder=(1, 2, 4, 8, 16, 32))
    g = gather(partial, adaptive=plan)       # pipeline.eval.sweep_results: one more group per target
    g.per_k[plan.group(0)]                   # that target's chosen reconstructions: statistics, PSNR sums
    g.adaptive[plan.group(0)]                # its tally: mean tokens, missed, decodes if searched

The sweep already decodes every k of an image from the same initial noise, so a chunk of finished images holds
each image's whole table: PSNR (and Inception features) at every k. Per image and target, the chosen k is what
`pretokenize --adaptive` would pick: pipeline.data.adaptive.search_ladder run on that table, the same lockstep
bisection, the same Criterion, the same PSNR function; `decodes` counts the rungs that bisection looked at,
i.e. the decoder calls the live search would have spent. The chosen k's row (features, logits, pixel metrics)
then joins the target's group, which is summarised like any k (FID from merged statistics, a bounded subset).
No per-image array outlives its chunk. The table holds only the sweep's k's, so every rung of the ladder must
be one of them (the ladder defaults to all of them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from flextok.errors import SettingError

from ..data.adaptive import Criterion, SearchResult, max_decodes, parse_adaptive, search_ladder
from .sweep import REAL

ADAPTIVE = -2  # the group of the i-th target is ADAPTIVE - i (REAL = 0 and ERROR = -1 are taken)


def parse_targets(text: str) -> tuple[Criterion, ...]:
    """'psnr:14,psnr:16' -> Criteria, in the given order; a ValueError with a one-line reason otherwise."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SettingError(
            f"adaptive {text!r}: expected CRITERION:TARGET[,CRITERION:TARGET...], e.g. psnr:15", "adaptive"
        )
    criteria = tuple(parse_adaptive(p) for p in parts)
    if len(set(criteria)) != len(criteria):
        raise SettingError(f"adaptive {text!r}: a target is repeated", "adaptive")
    return criteria


def check_ladder(ladder: list[int], ks: tuple[int, ...]) -> tuple[int, ...]:
    """The ladder, once every rung is one of the sweep's k's (only those are decoded); else a ValueError."""
    missing = [k for k in ladder if k not in ks]
    if missing:
        raise SettingError(
            f"ladder {list(ladder)}: k={missing} not among the sweep's k's {list(ks)}: every rung must be decoded",
            "ladder",
        )
    return tuple(ladder)


@dataclass(frozen=True)
class AdaptivePlan:
    """The targets to evaluate and the ladder their search climbs."""

    criteria: tuple[Criterion, ...]
    ladder: tuple[int, ...]

    def group(self, i: int) -> int:
        return ADAPTIVE - i

    @property
    def groups(self) -> list[tuple[int, Criterion]]:
        return [(self.group(i), c) for i, c in enumerate(self.criteria)]

    @property
    def needs_original_features(self) -> bool:
        """An Inception target compares each reconstruction's features with the original's."""
        return any(c.name == "inception" for c in self.criteria)


def score_table(chunk: dict[str, np.ndarray], ladder: tuple[int, ...], criterion: Criterion) -> np.ndarray:
    """[n, L] scores of a chunk's good images at every rung: PSNR as the sweep measured it, or the cosine
    distance between the original's and the reconstruction's Inception pool features (as InceptionScorer)."""
    if criterion.score_name == "psnr":
        return np.stack([chunk[f"psnr_{k}"] for k in ladder], axis=1)
    real = _unit(chunk[f"features_{REAL}"])  # [n, D]
    return np.stack([1.0 - (real * _unit(chunk[f"features_{k}"])).sum(axis=1) for k in ladder], axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def choose(scores: np.ndarray, ladder: tuple[int, ...], criterion: Criterion) -> SearchResult:
    """The live search's answer, replayed on a fully decoded table [n, L]: search_ladder looking scores up."""
    rung = {k: j for j, k in enumerate(ladder)}

    def lookup(idx: np.ndarray, ks: np.ndarray) -> np.ndarray:
        return scores[idx, [rung[int(k)] for k in ks]]

    return search_ladder(len(scores), list(ladder), criterion, lookup)


def chosen_rows(chunk: dict[str, np.ndarray], name: str, ks: np.ndarray) -> np.ndarray | None:
    """Image i's row of `name` (features, logits, psnr, ...) at its chosen k ks[i]; None if the chunk has none."""
    if not len(ks) or f"{name}_{int(ks[0])}" not in chunk:
        return None
    out = np.empty_like(chunk[f"{name}_{int(ks[0])}"])
    for k in np.unique(ks):
        pick = ks == k
        out[pick] = chunk[f"{name}_{int(k)}"][pick]
    return out


@dataclass
class Tally:
    """One target's running counts over every image (bounded: one counter per ladder rung)."""

    criterion: Criterion
    images: int = 0
    tokens: int = 0
    missed: int = 0
    decodes: int = 0
    decodes_max: int = 0
    histogram: Counter = field(default_factory=Counter)  # chosen k -> images

    def add(self, r: SearchResult) -> None:
        self.images += len(r.k)
        self.tokens += int(r.k.sum())
        self.missed += int(r.missed.sum())
        self.decodes += int(r.decodes.sum())
        self.decodes_max = max(self.decodes_max, int(r.decodes.max(initial=0)))
        self.histogram.update(int(k) for k in r.k)

    def summary(self, ladder: tuple[int, ...]) -> dict:
        n = self.images
        return {
            "target": str(self.criterion),
            "criterion": self.criterion.name,
            "target_value": self.criterion.target,
            "images": n,
            "mean_tokens": self.tokens / n if n else None,
            "missed": self.missed,
            "decodes_if_searched": {
                "mean": self.decodes / n if n else None,
                "max": self.decodes_max,
                "bound": max_decodes(len(ladder), self.criterion),
            },
            "k_histogram": {str(k): self.histogram[k] for k in ladder if self.histogram[k]},
        }
