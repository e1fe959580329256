"""A sweep's outputs: results.json, the FID-vs-tokens plot, the image grid, and a Markdown table.

results = summarize(gathered, ks, reference, opts)      # per-k metrics + counters
write_outputs(output, results, gathered, ks, ...)       # results.json, fid_vs_tokens.png, <grid>.png
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .fid import Reference
from .sweep import REAL, Gathered, MetricOptions, is_unavailable_reason, metrics_for_k


def summarize(g: Gathered, ks: tuple[int, ...], ref: Reference, opts: MetricOptions) -> dict:
    """Per-k metrics and the work counters (per image: encoder calls, real-image feature passes)."""
    n = len(g.keys)
    per_k = [metrics_for_k(g, k, ref, opts) for k in ks]
    work = {
        "images": n,
        "bad_inputs": len(g.errors),
        "encoder_calls_per_image": g.encode_calls / n if n else None,
        "real_feature_passes": g.real_feature_passes / n if n else None,
        "decodes_per_image": len(ks),
    }
    return {"per_k": per_k, "work": work, "bad_inputs": g.errors, "is_unavailable": is_unavailable_reason(g)}


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


def image_grid(
    grid: dict[str, dict[int, bytes]], keys: list[str], columns: list[int], path: Path, names: dict[int, str]
):
    """Rows = images (in `keys` order), columns = `columns` (e.g. REAL then each k), each column labelled."""
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
    fig.savefig(path)
    return path


def column_names(ks: tuple[int, ...], with_original: bool) -> tuple[list[int], dict[int, str]]:
    columns = ([REAL] if with_original else []) + list(ks)
    names = {REAL: "original", **{k: f"k={k}" for k in ks}}
    return columns, names


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_outputs(
    output: Path,
    results: dict,
    provenance: dict,
    run: dict,
    g: Gathered,
    ks: tuple[int, ...],
    grid_keys: list[str],
    grid_file: str,
    with_original: bool,
    metric_name: str,
    title: str,
) -> dict:
    """results.json, results.md, fid_vs_tokens.png and the image grid; returns {name: path}."""
    files = {"results": output / "results.json", "table": output / "results.md", "plot": output / "fid_vs_tokens.png"}
    fid_figure(results["per_k"], metric_name, title).savefig(files["plot"])
    columns, names = column_names(ks, with_original)
    if image_grid(g.grid, grid_keys, columns, output / grid_file, names) is not None:
        files["grid"] = output / grid_file
    files["table"].write_text(results_table(results, metric_name) + "\n")
    doc = {**results, "provenance": provenance, "run": run, "files": {k: v.name for k, v in files.items()}}
    write_json(files["results"], doc)
    return {k: str(v) for k, v in files.items()}
