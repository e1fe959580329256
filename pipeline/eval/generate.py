"""Generation sweep stage: class-balanced AR samples over FlexTok tokens, decoded, for every k.

    rows = ray.data.from_items(sample_groups(N, G))     # one row per group of G consecutive samples
    rows = rows.map_batches(GenerateStage)              # actor: AR generate k tokens per group and k; decode
    rows = with_inception_features(rows)                # then as the reconstruction sweep (pipeline.eval.sweep)

Sample i has key `sample-{i:08d}` and class label i % num_classes, so any N is as balanced as it can be and
the first N samples do not depend on N. A group's tokens for k come from a CPU generator seeded by
sha256(seed, group, k) (the AR draws one uniform per row and step, so a group is the unit of determinism);
the decoder's noise per (sample, k) as in the reconstruction sweep. Each k gets its own samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import stage_device
from .sweep import DecodeSettings, RowBuilder, decode_prefixes, png_bytes


@dataclass(frozen=True)
class SamplingSettings:
    """The AR sampler's settings (all of them decide the numbers)."""

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def sample_key(i: int) -> str:
    return f"sample-{i:08d}"


def sample_label(i: int, num_classes: int) -> int:
    return i % num_classes


def sample_groups(num_samples: int, group_size: int) -> list[dict]:
    """Rows of the input dataset: {group, start, count}."""
    return [
        {"group": g, "start": start, "count": min(group_size, num_samples - start)}
        for g, start in enumerate(range(0, num_samples, group_size))
    ]


def group_seed(seed: int, group: int, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"ar|{seed}|{group}|{k}".encode()).digest()[:8], "little") >> 1


class GenerateStage:
    """Ray Data actor UDF: group rows -> one row per (sample, k), sample-major, images decoded in batches that
    mix k's. Holds the AR model and the FlexTok decoder."""

    def __init__(
        self,
        ar: str,
        model: str,
        ks: tuple[int, ...],
        sampling: dict,
        settings: dict,
        num_classes: int,
        grid_keys: list[str],
        device: str = "cpu",
        threads: int | None = None,
    ):
        from flextok import FlexTok
        from flextok.ar import ARModel

        if threads:
            torch.set_num_threads(threads)
        device = stage_device("the generation sweep's actor", device == "cuda")
        self.ar = ARModel.from_pretrained(ar, map_location=device).eval()
        self.model = FlexTok.from_pretrained(model, map_location=device).eval()
        self.ks, self.sampling, self.s = ks, SamplingSettings(**sampling), DecodeSettings(**settings)
        self.num_classes, self.grid = num_classes, set(grid_keys)

    def generate(self, group: int, labels: torch.Tensor, k: int) -> torch.Tensor:
        """[G] labels -> [G, k] token ids."""
        gen = torch.Generator().manual_seed(group_seed(self.s.seed, group, k))
        p = self.sampling
        return self.ar.generate(labels.to(self.ar.device), k, p.cfg_scale, p.temperature, p.top_k, p.top_p, gen).cpu()

    @torch.no_grad()  # not a global switch: stages also run in-process (tests, local mode)
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples: list[tuple[str, int]] = []  # (key, label) in sample order
        prefixes: list[torch.Tensor] = []
        for group, start, count in zip(batch["group"], batch["start"], batch["count"], strict=True):
            indices = range(int(start), int(start) + int(count))
            labels = torch.tensor([sample_label(i, self.num_classes) for i in indices])
            tokens = {k: self.generate(int(group), labels, k) for k in self.ks}  # k -> [G, k]
            for row, i in enumerate(indices):
                samples.append((sample_key(i), int(labels[row])))
                prefixes += [tokens[k][row] for k in self.ks]
        jobs = [(key, k) for key, _ in samples for k in self.ks]
        images = decode_prefixes(self.model, prefixes, jobs, self.s)  # [S * len(ks), R, R, 3]
        out = RowBuilder(self.model.cfg.image_size)
        for (key, label), j in zip(samples, range(0, len(jobs), len(self.ks)), strict=True):
            for m, k in enumerate(self.ks):
                image = images[j + m]
                out.add(key, label, k, image, True, png_bytes(image) if key in self.grid else b"", decoded=1)
        return out.batch()
