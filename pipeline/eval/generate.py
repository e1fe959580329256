"""Generation sweep stage: class-balanced AR samples over FlexTok tokens, decoded, for every k.

    rows = ray.data.from_items(sample_groups(N, G))     # one row per group of G consecutive samples
    rows = rows.map_batches(GenerateStage)              # actor: AR generate k tokens per group and k; decode
    rows = with_inception_features(rows)                # then as the reconstruction sweep (pipeline.eval.sweep)

Sample i has key `sample-{i:08d}` and class label i % num_classes, so any N is as balanced as it can be and
the first N samples do not depend on N. A group's tokens for k come from a CPU generator seeded by
sha256(seed, group, k) (the AR draws one uniform per row and step, so a group is the unit of determinism);
the decoder's noise per (sample, k) as in the reconstruction sweep. Each k gets its own samples.

An AR model with an end-of-sequence token (`ARConfig.eos`) takes k as the most tokens a sample may have: each
sample ends at its EOS and is decoded from the tokens it has. The stage then writes each group's lengths to
`<lengths_url>/group-NNNNNN.json` (it alone sees them; the sweep's rows carry images), and the job reads them
back into results.json (`length_summary`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..data.corpus import join, output_fs
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
        lengths_url: str | None = None,
    ):
        from flextok import FlexTok
        from flextok.ar import ARModel

        if threads:
            torch.set_num_threads(threads)
        device = stage_device("the generation sweep's actor", device == "cuda")
        self.ar = ARModel.from_pretrained(ar, map_location=device).eval()
        self.model = FlexTok.from_pretrained(model, map_location=device).eval()
        self.ks, self.sampling, self.s = ks, SamplingSettings(**sampling), DecodeSettings(**settings)
        self.num_classes, self.grid, self.lengths_url = num_classes, set(grid_keys), lengths_url

    def generate(self, group: int, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[G] labels -> token ids [G, T] and lengths [G] (T = k and every length k without EOS; with EOS, at
        most k, and the ids after a sample's length are EOS)."""
        gen = torch.Generator().manual_seed(group_seed(self.s.seed, group, k))
        p = self.sampling
        labels = labels.to(self.ar.device)
        tokens, lengths = self.ar.generate(
            labels, k, p.cfg_scale, p.temperature, p.top_k, p.top_p, gen, return_lengths=True
        )
        return tokens.cpu(), lengths.cpu()

    @torch.no_grad()  # not a global switch: stages also run in-process (tests, local mode)
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples: list[tuple[str, int]] = []  # (key, label) in sample order
        prefixes: list[torch.Tensor] = []
        for group, start, count in zip(batch["group"], batch["start"], batch["count"], strict=True):
            indices = range(int(start), int(start) + int(count))
            labels = torch.tensor([sample_label(i, self.num_classes) for i in indices])
            out = {k: self.generate(int(group), labels, k) for k in self.ks}  # k -> ([G, T], [G])
            for row, i in enumerate(indices):
                samples.append((sample_key(i), int(labels[row])))
                prefixes += [out[k][0][row, : out[k][1][row]] for k in self.ks]
            if self.lengths_url is not None:
                write_lengths(self.lengths_url, int(group), int(start), {k: out[k][1].tolist() for k in self.ks})
        jobs = [(key, k) for key, _ in samples for k in self.ks]
        images = decode_prefixes(self.model, prefixes, jobs, self.s)  # [S * len(ks), R, R, 3]
        out = RowBuilder(self.model.cfg.image_size)
        for (key, label), j in zip(samples, range(0, len(jobs), len(self.ks)), strict=True):
            for m, k in enumerate(self.ks):
                image = images[j + m]
                out.add(key, label, k, image, True, png_bytes(image) if key in self.grid else b"", decoded=1)
        return out.batch()


# ------------------------------------------------------------------------- generated lengths (EOS models)
def write_lengths(url: str, group: int, start: int, lengths: dict[int, list[int]]) -> None:
    """One group's sample lengths per k, as `<url>/group-NNNNNN.json` (written whole, then moved into place)."""
    fs, root = output_fs(url)
    fs.makedirs(root, exist_ok=True)
    path = join(root, f"group-{group:06d}.json")
    fs.pipe_file(
        path + ".tmp", json.dumps({"start": start, "lengths": {str(k): v for k, v in lengths.items()}}).encode()
    )
    fs.mv(path + ".tmp", path)


def length_summary(url: str, groups: list[dict], ks: tuple[int, ...]) -> dict:
    """Per k: mean generated length and its histogram {length: samples} over the `groups` (sample_groups rows)
    whose lengths file exists; `samples` says how many that covers."""
    fs, root = output_fs(url)
    per_k: dict[int, Counter] = {k: Counter() for k in ks}
    samples = 0
    for g in groups:
        path = join(root, f"group-{g['group']:06d}.json")
        if not fs.isfile(path):
            continue
        stored = json.loads(fs.cat_file(path))["lengths"]
        for k in ks:
            per_k[k].update(stored[str(k)])
        samples += len(stored[str(ks[0])])
    rows = []
    for k in ks:
        n = sum(per_k[k].values())
        mean = sum(length * c for length, c in per_k[k].items()) / n if n else None
        rows.append({"k": k, "mean": mean, "histogram": {str(n): c for n, c in sorted(per_k[k].items())}})
    return {"samples": samples, "per_k": rows}


def length_table(summary: dict) -> str:
    """Markdown: per k, the mean generated length and the histogram."""
    lines = ["| k | mean length | samples per length |", "|---:|---:|---|"]
    for r in summary["per_k"]:
        mean = "-" if r["mean"] is None else f"{r['mean']:.2f}"
        lines.append(f"| {r['k']} | {mean} | {', '.join(f'{n}: {c}' for n, c in r['histogram'].items())} |")
    return "\n".join(lines)
