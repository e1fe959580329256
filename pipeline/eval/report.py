"""A sweep's metrics per k and its outputs: results.json, results.md, the FID-vs-tokens plot, the image grid.

results = summarize(gathered, ks, reference, MetricOptions())      # per-k metrics + work counters
files = write_outputs(url, results, gathered, Report(...))         # any fsspec URL
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.corpus import join, output_fs
from ..inception import NO_CLASSIFIER
from .fid import Reference, inception_score, kernel_inception_distance, low_rank_factor, precision_recall
from .sweep import REAL
from .sweep_results import Gathered, PerK

IS_SPLITS = 10  # torch-fidelity's default


@dataclass(frozen=True)
class MetricOptions:
    prc: bool = True
    kid: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    feature_subset: int = 10_000  # images per k whose features feed precision/recall, KID and IS (ADM's 10k)
    subset_seed: int = 0


def metrics_for_k(s: PerK, k: int, ref: Reference, opts: MetricOptions) -> dict:
    """One k's row of results.json. FID from the merged statistics of every image; precision/recall, KID and
    IS from the bounded subset (every image when there are at most `feature_subset`)."""
    stats, subset = s.stats, s.subset
    row: dict = {"k": k, "num_samples": stats.n, "subset_size": len(subset.features)}
    factor = low_rank_factor(subset.features) if subset.complete and stats.n else None
    row["fid"] = ref.frechet().distance(stats.mu, stats.sigma, factor) if stats.n >= 2 else None
    features = subset.features
    if opts.prc:
        row.update(_with_reference_features(ref, "prc", lambda r: precision_recall(features, r)))
    if opts.kid:
        row.update(
            _with_reference_features(
                ref, "kid", lambda r: kernel_inception_distance(features, r, opts.kid_subsets, opts.kid_subset_size)
            )
        )
    enough = subset.logits is not None and len(subset.logits) >= IS_SPLITS
    row.update(inception_score(subset.logits, IS_SPLITS) if enough else {"is_mean": None, "is_std": None})
    for m in ("psnr", "ssim", "mse"):
        row[m] = s.pixel_mean(m)
    return row


def _with_reference_features(ref: Reference, name: str, fn) -> dict:
    """KID and precision/recall compare feature sets: with a mu/sigma-only reference (ADM's) say so instead."""
    if ref.features is None:
        return {f"{name}_unavailable": f"the reference {ref.source} has no feature vectors (mu/sigma only)"}
    return fn(ref.features)


def summarize(g: Gathered, ks: tuple[int, ...], ref: Reference, opts: MetricOptions) -> dict:
    """Per-k metrics and the work counters (per image: encoder calls, decoder outputs, real-image feature
    passes), all counted by the stages."""
    n = g.images
    per_k = [metrics_for_k(g.per_k[k], k, ref, opts) for k in ks]
    work = {
        "images": n,
        "bad_inputs": len(g.errors),
        "encoder_calls_per_image": g.encode_calls / n if n else None,
        "real_feature_passes": g.real_feature_passes / n if n else None,
        "decodes_per_image": g.decode_calls / n if n else None,
        "class_counts": class_counts(g.label_counts),
    }
    subset = {"limit": g.subset_size, "rule": f"the images with the smallest sha256('{opts.subset_seed}|' + key)"}
    return {
        "per_k": per_k,
        "work": work,
        "feature_subset": subset,
        "bad_inputs": g.errors,
        "is_unavailable": None if g.has_logits else NO_CLASSIFIER,
    }


def class_counts(counts) -> dict:
    """How balanced the labels are: the number of classes used, the fewest and most images per class
    (label -1, no label, is not a class)."""
    used = [c for label, c in counts.items() if label >= 0 and c > 0]
    return {"classes": len(used), "min": min(used, default=0), "max": max(used, default=0)}


def results_table(results: dict, metric_name: str = "rFID") -> str:
    """Markdown table of the per-k results."""

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        f"| k | {metric_name} | precision | recall | IS | PSNR | SSIM | MSE | n |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["per_k"]:
        cells = [
            str(r["k"]),
            fmt(r.get("fid"), ".2f"),
            fmt(r.get("precision"), ".3f"),
            fmt(r.get("recall"), ".3f"),
            fmt(r.get("is_mean"), ".2f"),
            fmt(r.get("psnr"), ".2f"),
            fmt(r.get("ssim"), ".4f"),
            fmt(r.get("mse"), ".1f"),
            str(r["num_samples"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fid_figure(per_k: list[dict], ylabel: str, title: str):
    """The paper's curve: FID against the number of tokens k, log2 x axis, one tick per k."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [r for r in per_k if r.get("fid") is not None]
    ks = [r["k"] for r in rows]
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(ks, [r["fid"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("number of tokens k")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def image_grid(grid: dict[str, dict[int, bytes]], keys: list[str], columns: list[int], names: dict[int, str]):
    """Rows = images (in `keys` order), columns = `columns` (e.g. REAL then each k), each column labelled;
    None when no key has images."""
    from matplotlib.figure import Figure

    keys = [k for k in keys if k in grid]
    if not keys:
        return None
    fig = Figure(figsize=(1.2 * len(columns), 1.2 * len(keys) + 0.3), dpi=120)
    axes = fig.subplots(len(keys), len(columns), squeeze=False)
    for r, key in enumerate(keys):
        for c, col in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if col in grid[key]:
                ax.imshow(np.asarray(Image.open(io.BytesIO(grid[key][col])).convert("RGB")))
            if r == 0:
                ax.set_title(names[col], fontsize=8)
            if c == 0:
                ax.set_ylabel(key if len(key) <= 18 else "..." + key[-15:], fontsize=6)
    fig.tight_layout()
    return fig


def column_names(ks: tuple[int, ...], with_original: bool) -> tuple[list[int], dict[int, str]]:
    columns = ([REAL] if with_original else []) + list(ks)
    names = {REAL: "original", **{k: f"k={k}" for k in ks}}
    return columns, names


@dataclass(frozen=True)
class Report:
    """What a sweep's outputs show besides the numbers."""

    provenance: dict  # results.json's provenance block
    run: dict  # wall time, images this run
    grid_keys: list[str]  # rows of the image grid
    grid_file: str  # recon_grid.png | samples_grid.png
    with_original: bool  # a first grid column with the original image
    metric_name: str  # rFID | gFID
    title: str


def write_outputs(output: str, results: dict, g: Gathered, *, ks: tuple[int, ...], report: Report) -> dict:
    """results.json, results.md, fid_vs_tokens.png and the image grid into `output` (a folder or fsspec URL);
    returns {name: path}."""
    fs, root = output_fs(str(output))
    fs.makedirs(root, exist_ok=True)
    names = {"results": "results.json", "table": "results.md", "plot": "fid_vs_tokens.png"}
    _write_figure(fs, join(root, names["plot"]), fid_figure(results["per_k"], report.metric_name, report.title))
    columns, labels = column_names(ks, report.with_original)
    grid = image_grid(g.grid, report.grid_keys, columns, labels)
    if grid is not None:
        names["grid"] = report.grid_file
        _write_figure(fs, join(root, report.grid_file), grid)
    fs.pipe_file(join(root, names["table"]), (results_table(results, report.metric_name) + "\n").encode())
    doc = {**results, "provenance": report.provenance, "run": report.run, "files": names}
    path = join(root, names["results"])
    fs.pipe_file(path + ".tmp", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    fs.mv(path + ".tmp", path)
    return {name: _shown(output, file) for name, file in names.items()}


def _write_figure(fs, path: str, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fs.pipe_file(path, buf.getvalue())


def _shown(output: str, name: str) -> str:
    return str(output).rstrip("/") + "/" + name
