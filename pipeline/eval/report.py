"""A sweep's metrics per k and its outputs: results.json, results.md, the FID-vs-tokens plot, the image grid.

results = summarize(gathered, ks, reference, MetricOptions())      # per-k metrics + work counters
files = write_outputs(url, results, gathered, Report(...))         # any fsspec URL

With adaptive targets (pipeline.eval.sweep_adaptive) results.json also holds `adaptive`: mean tokens against
PSNR and rFID for each fixed k and each target, drawn in rate_vs_quality.png, and adaptive_grid.png shows the
grid photos ordered by their chosen k.
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
from .sweep_adaptive import AdaptivePlan
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


def summarize(
    g: Gathered, ks: tuple[int, ...], ref: Reference, opts: MetricOptions, adaptive: AdaptivePlan | None = None
) -> dict:
    """Per-k metrics and the work counters (per image: encoder calls, decoder outputs, real-image feature
    passes), all counted by the stages; with `adaptive`, the rate-quality block (adaptive_results)."""
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
    out = {
        "per_k": per_k,
        "work": work,
        "feature_subset": subset,
        "bad_inputs": g.errors,
        "is_unavailable": None if g.has_logits else NO_CLASSIFIER,
    }
    if adaptive is not None:
        out["adaptive"] = adaptive_results(g, per_k, ref, opts, adaptive)
    return out


def adaptive_results(g: Gathered, per_k: list[dict], ref: Reference, opts: MetricOptions, plan: AdaptivePlan) -> dict:
    """Mean tokens per image against quality: every fixed k (k tokens each) and every adaptive target (its
    chosen k's, counted: mean tokens, missed, the decodes its live search would spend), on the same images."""
    targets = []
    for group, _ in plan.groups:
        row = metrics_for_k(g.per_k[group], group, ref, opts)
        del row["k"]
        targets.append({**g.adaptive[group].summary(plan.ladder), "group": group, **row})
    fixed = [{"k": r["k"], "mean_tokens": float(r["k"]), "psnr": r["psnr"], "fid": r["fid"]} for r in per_k]
    return {
        "ladder": list(plan.ladder),
        "rule": "per image, the k that pipeline.data.adaptive.search_ladder (the pretokenize --adaptive search) "
        "picks, replayed on the table of every k the sweep decoded from the image's one noise: no extra decoder call",
        "fixed_k": fixed,
        "targets": targets,
    }


def class_counts(counts) -> dict:
    """How balanced the labels are: the number of classes used, the fewest and most images per class
    (label -1, no label, is not a class)."""
    used = [c for label, c in counts.items() if label >= 0 and c > 0]
    return {"classes": len(used), "min": min(used, default=0), "max": max(used, default=0)}


def results_table(results: dict, metric_name: str = "rFID") -> str:
    """Markdown table of the per-k results (and of the adaptive targets, when there are some)."""
    lines = [
        f"| k | {metric_name} | precision | recall | IS | PSNR | SSIM | MSE | n |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["per_k"]:
        cells = [
            str(r["k"]),
            _fmt(r.get("fid"), ".2f"),
            _fmt(r.get("precision"), ".3f"),
            _fmt(r.get("recall"), ".3f"),
            _fmt(r.get("is_mean"), ".2f"),
            _fmt(r.get("psnr"), ".2f"),
            _fmt(r.get("ssim"), ".4f"),
            _fmt(r.get("mse"), ".1f"),
            str(r["num_samples"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "adaptive" in results:
        lines += ["", adaptive_table(results["adaptive"], metric_name)]
    return "\n".join(lines)


def adaptive_table(adaptive: dict, metric_name: str = "rFID") -> str:
    """Markdown table of the adaptive targets (mean tokens against quality)."""
    lines = [
        f"| target | mean tokens | {metric_name} | PSNR | SSIM | missed | decodes if searched (mean / max / bound) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in adaptive["targets"]:
        d = t["decodes_if_searched"]
        cells = [t["target"], _fmt(t["mean_tokens"], ".2f"), _fmt(t["fid"], ".2f"), _fmt(t["psnr"], ".2f")]
        cells += [
            _fmt(t["ssim"], ".4f"),
            f"{t['missed']} / {t['images']}",
            f"{_fmt(d['mean'], '.2f')} / {d['max']} / {d['bound']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


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


def rate_figure(adaptive: dict, metric_name: str, title: str):
    """Mean tokens per image (log2 x) against mean PSNR and against FID: the fixed-k curve and one point per
    adaptive target, on the same images."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=120)
    fixed, targets = adaptive["fixed_k"], adaptive["targets"]
    ks = [r["k"] for r in fixed]
    for i, (metric, ylabel) in enumerate((("psnr", "mean PSNR (dB)"), ("fid", metric_name))):
        ax = fig.add_subplot(1, 2, i + 1)
        rows = [r for r in fixed if r[metric] is not None]
        ax.plot([r["mean_tokens"] for r in rows], [r[metric] for r in rows], marker="o", label="fixed k")
        for r in rows:
            ax.annotate(
                f"k={r['k']}", (r["mean_tokens"], r[metric]), fontsize=6, xytext=(2, -8), textcoords="offset points"
            )
        for t in (t for t in targets if t[metric] is not None and t["mean_tokens"] is not None):
            ax.plot([t["mean_tokens"]], [t[metric]], marker="*", markersize=10, linestyle="none", label=t["target"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("mean tokens per image")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def adaptive_grid(g: Gathered, keys: list[str], targets: list[dict]):
    """One row per grid photo, ordered by its chosen k's (first target first): the original, then each target's
    reconstruction, its k written under it. None when no photo has them."""
    from matplotlib.figure import Figure

    groups = [t["group"] for t in targets]
    keys = [k for k in keys if k in g.grid and REAL in g.grid[k] and all(x in g.chosen.get(k, {}) for x in groups)]
    if not keys:
        return None
    keys.sort(key=lambda key: [g.chosen[key][x][0] for x in groups])  # stable: input order among equals
    columns = [REAL, *groups]
    fig = Figure(figsize=(1.3 * len(columns), 1.35 * len(keys) + 0.3), dpi=120)
    axes = fig.subplots(len(keys), len(columns), squeeze=False)
    for r, key in enumerate(keys):
        for c, col in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            ax.imshow(np.asarray(Image.open(io.BytesIO(g.grid[key][col])).convert("RGB")))
            if r == 0:
                ax.set_title("original" if col == REAL else targets[c - 1]["target"], fontsize=8)
            if col != REAL:
                k, missed = g.chosen[key][col]
                ax.set_xlabel(f"k={k}" + (" (missed)" if missed else ""), fontsize=7)
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
    """results.json, results.md, fid_vs_tokens.png and the image grid (with adaptive targets also
    rate_vs_quality.png and adaptive_grid.png) into `output` (a folder or fsspec URL); returns {name: path}."""
    fs, root = output_fs(str(output))
    fs.makedirs(root, exist_ok=True)
    names = {"results": "results.json", "table": "results.md", "plot": "fid_vs_tokens.png"}
    _write_figure(fs, join(root, names["plot"]), fid_figure(results["per_k"], report.metric_name, report.title))
    columns, labels = column_names(ks, report.with_original)
    grid = image_grid(g.grid, report.grid_keys, columns, labels)
    if grid is not None:
        names["grid"] = report.grid_file
        _write_figure(fs, join(root, report.grid_file), grid)
    if "adaptive" in results:
        names["rate_plot"] = "rate_vs_quality.png"
        rate = rate_figure(results["adaptive"], report.metric_name, report.title)
        _write_figure(fs, join(root, names["rate_plot"]), rate)
        grid = adaptive_grid(g, report.grid_keys, results["adaptive"]["targets"])
        if grid is not None:
            names["adaptive_grid"] = "adaptive_grid.png"
            _write_figure(fs, join(root, names["adaptive_grid"]), grid)
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
