"""A sweep's outputs: results.json, the FID-vs-tokens plot, the image grid, and a Markdown table.

results = summarize(gathered, ks, reference, opts)      # per-k metrics + counters
write_outputs(output, results, gathered, ks, ...)       # results.json, fid_vs_tokens.png, <grid>.png
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
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


def png_of(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(
    output: str | Path,
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
    """results.json, results.md, fid_vs_tokens.png and the image grid in `output` (a local folder or an
    fsspec URL); returns {name: path or URL}. results.json comes last, written whole and renamed."""
    fs, root = fsspec.core.url_to_fs(str(output))
    fs.makedirs(root, exist_ok=True)
    names = {"results": "results.json", "table": "results.md", "plot": "fid_vs_tokens.png"}
    fs.pipe_file(f"{root}/{names['plot']}", png_of(fid_figure(results["per_k"], metric_name, title)))
    columns, labels = column_names(ks, with_original)
    grid = image_grid(g.grid, grid_keys, columns, labels)
    if grid is not None:
        names["grid"] = grid_file
        fs.pipe_file(f"{root}/{grid_file}", png_of(grid))
    fs.pipe_file(f"{root}/{names['table']}", (results_table(results, metric_name) + "\n").encode())
    doc = {**results, "provenance": provenance, "run": run, "files": names}
    fs.pipe_file(f"{root}/results.json.tmp", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    fs.mv(f"{root}/results.json.tmp", f"{root}/results.json")
    base = str(output).rstrip("/")
    return {k: f"{base}/{name}" for k, name in names.items()}
