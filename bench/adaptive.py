"""Rate against quality of adaptive token budgets vs fixed k, on a tokenizer's held-out photos.

    python bench/adaptive.py --model models/flextok-small --output /tmp/adaptive      # results.json + rate.png
    python bench/adaptive.py --model runs/tokenizer-small/checkpoint_000NNNNN/ema --targets 20,22,24 --limit 16

1. Every photo is decoded at every rung of the ladder from its own noise (seed + i, the same for every k):
   a table of PSNR [N, L] (and Inception cosine distance with --inception). From it: how often quality is not
   monotone in k, and fixed k's mean tokens / mean PSNR.
2. For each target, the search (pipeline.data.adaptive.search_ladder, the code the pretokenize job runs) replays on
   that table: chosen k, misses, decodes per image; also how often it differs from the exhaustive answer (the
   smallest k meeting a PSNR target; the k maximising PSNR - LAMBDA * k for a `psnr-slope:LAMBDA` target).
3. `--live` repeats one target's search for real (mixed-k decode calls) and checks it picks the same k's.
4. Fixed k = round(adaptive's mean tokens) is decoded for every target: the equal-tokens comparison.

`--length-predictor PATH` also scores a length predictor's picks (zero decodes) on the decoded table: for each
target its threshold rule (calibrated margin), and its equal-slope rule for a few LAMBDAs, each against the
search and against fixed k at equal mean tokens. A predictor calibrated on these very photos needs
`--calibration-folds 5`: each fold's margins are then set on the other folds' curves, and the figures are
averaged over `--calibration-splits` (20) random assignments of photos to folds (their range is reported too).

`--table-only` stops after step 1 and saves the table (`table.npz`: files, tokens, ladder, psnr), the training
data of the length predictor (jobs/train_length_predictor.py):

    python bench/adaptive.py --list models/flextok-small/train.csv --table-only --output out/adaptive-train
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flextok import FlexTok  # noqa: E402
from pipeline.data.adaptive import (  # noqa: E402
    Criterion,
    Decoding,
    PSNRScorer,
    best_slope,
    decode_prefixes,
    image_noise,
    make_scorer,
    max_decodes,
    non_monotone,
    parse_adaptive,
    parse_ladder,
    score_every_k,
    search_ladder,
    search_lengths,
    smallest_meeting,
)
from pipeline.data.length_predictor import LengthPredictor, Rule, calibrated_margin, choose_rungs  # noqa: E402
from pipeline.data.preprocess import AUGMENT_MODES, augmented_views, decode_image, to_rgb  # noqa: E402

SLOPES = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8]  # LAMBDAs (dB per token) of the equal-slope points
SCORES = ("psnr", "inception")  # the order of `scorers` and `tables` in main (inception with --inception)


def replay(table: np.ndarray, ladder: list[int], criterion: Criterion):
    """The search run against a table of scores [N, L] instead of the decoder."""
    column = {k: j for j, k in enumerate(ladder)}
    return search_ladder(len(table), ladder, criterion, lambda idx, ks: table[idx, [column[int(k)] for k in ks]])


def load_views(folder: Path, names: list[str], resolution: int, views: tuple[int, ...]):
    """Each photo's views (augmentation ids, pipeline.data.preprocess numbering; 0 = the ADM center crop):
    (uint8 [N, R, R, 3] with N = photos x views, photo index [N], augmentation id [N])."""
    rows, groups, augs = [], [], []
    for i, name in enumerate(names):
        img = to_rgb(decode_image((folder / name).read_bytes()))
        rows += augmented_views(img, resolution, views)
        groups += [i] * len(views)
        augs += list(views)
    return np.stack(rows), groups, augs


def same_table(
    path: Path,
    files: list[str],
    augs: list[int],
    ladder: list[int],
    seeds: list[int],
    dec: Decoding,
    inception: bool = False,
) -> bool:
    """Whether a saved table.npz was decoded for these photos and views, rungs, seeds and decoder settings (and
    holds the Inception distances when `inception`)."""
    if not path.is_file():
        return False
    saved = np.load(path)
    saved_augs = saved["augs"].tolist() if "augs" in saved.files else [0] * len(saved["files"])
    return (
        (not inception or "inception" in saved.files)
        and saved_augs == augs
        and saved["files"].tolist() == files
        and saved["ladder"].tolist() == ladder
        and saved["seeds"].tolist() == seeds
        and (int(saved["timesteps"]), float(saved["guidance_scale"])) == (dec.timesteps, dec.guidance_scale)
    )


def adaptive_point(psnr: np.ndarray, table: np.ndarray, ladder: list[int], criterion: Criterion) -> dict:
    result = replay(table, ladder, criterion)
    if criterion.is_slope:
        exhaustive_k = best_slope(table, ladder, criterion.target)
    else:
        exhaustive_k, _ = smallest_meeting(table, ladder, criterion)
    cols = np.searchsorted(ladder, result.k)
    chosen_psnr = psnr[np.arange(len(psnr)), cols]
    return {
        "criterion": criterion.name,
        "target": criterion.target,
        "mean_tokens": float(result.k.mean()),
        "mean_psnr": float(chosen_psnr.mean()),
        "missed": int(result.missed.sum()),
        "met_fraction": float(1 - result.missed.mean()),
        "k_histogram": {int(k): int((result.k == k).sum()) for k in ladder},
        "decodes_mean": float(result.decodes.mean()),
        "decodes_max": int(result.decodes.max()),
        "decode_bound": max_decodes(len(ladder), criterion),
        "differs_from_exhaustive": int((result.k != exhaustive_k).sum()),
        "extra_tokens_vs_exhaustive": float((result.k - exhaustive_k).mean()),
        "k": result.k.tolist(),
    }


def equal_slope_points(psnr: np.ndarray, ladder: list[int], lambdas: list[float]) -> list[dict]:
    """Oracle reference, not a search: per image the k maximising PSNR_i(k) - lam * k over the whole decoded
    table (every rung decoded), i.e. tokens go where they buy the most dB. Shows what a per-image allocation
    could reach at equal mean tokens; the search cannot do this with its ceil(log2 L) + 1 decodes."""
    ks = np.asarray(ladder, np.float64)
    points = []
    for lam in lambdas:
        cols = np.argmax(psnr - lam * ks[None], axis=1)  # [N]
        chosen = psnr[np.arange(len(psnr)), cols]
        points.append({"lambda": lam, "mean_tokens": float(ks[cols].mean()), "mean_psnr": float(chosen.mean())})
    return points


def threshold_picks(predictor, pred: np.ndarray, psnr: np.ndarray, ladder, target: float, folds: int, split: int):
    """The threshold rule's (k [N], predicted miss [N], margins) on these photos. folds = 0: the predictor's own
    margin (its calibration photos must be other photos); folds = K: cross-fitted calibration on these photos,
    each fold's margin set on the other folds' predicted and decoded curves (no photo's k sees its own curve);
    `split` seeds the random assignment of photos to folds."""
    rule = Rule("psnr", target)
    if folds == 0:
        margin = predictor.margin(target)
        return (*choose_rungs(pred, ladder, rule, margin), [margin])
    fold = np.random.default_rng(split).permutation(len(psnr)) % folds
    k, missed, margins = np.zeros(len(psnr), np.int64), np.zeros(len(psnr), bool), []
    for f in range(folds):
        held = fold == f
        margins.append(calibrated_margin(pred[~held], psnr[~held], target, predictor.cfg.coverage))
        k[held], missed[held] = choose_rungs(pred[held], ladder, rule, margins[-1])
    return k, missed, margins


def predictor_points(
    predictor, tokens, psnr: np.ndarray, ladder: list[int], search: list[dict], calibration_folds: int, splits: int
) -> dict:
    """A length predictor's picks scored on the decoded table [N, L]: per `psnr` search point the threshold rule
    at the same target (threshold_picks; with cross-fitting, averaged over `splits` random fold assignments, as
    one split's figures move by a photo or two), then the equal-slope rule per LAMBDA."""
    pred = predictor.predict(tokens.cpu())  # [N, L], no decoder call
    calib = predictor.calib_psnr.double().numpy()
    if calibration_folds == 0 and calib.shape == psnr.shape and np.allclose(calib, psnr, atol=1e-3):
        raise SystemExit(
            "the length predictor was calibrated on these photos: its margins would be judged on their own "
            "calibration; pass --calibration-folds 5 (cross-fitted margins) or evaluate on other photos"
        )
    rows = np.arange(len(psnr))
    thresholds, slopes = [], []
    for point in (p for p in search if p["criterion"] == "psnr"):
        target = point["target"]
        reachable = (psnr >= target).any(axis=1)  # [N] photos that meet the target at some rung
        per_split = []
        for split in range(splits if calibration_folds else 1):
            k, predicted_miss, margins = threshold_picks(
                predictor, pred, psnr, ladder, target, calibration_folds, split
            )
            chosen = psnr[rows, np.searchsorted(ladder, k)]
            met = chosen >= target
            per_split.append({
                "margins_db": margins,
                "mean_tokens": float(k.mean()),
                "mean_psnr": float(chosen.mean()),
                "met": int(met.sum()),
                "met_of_reachable": float(met[reachable].mean()) if reachable.any() else 1.0,
                "predicted_miss": int(predicted_miss.sum()),
                "k_histogram": {int(r): int((k == r).sum()) for r in ladder},
            })  # fmt: skip
        mean = lambda key, runs=per_split: float(np.mean([s[key] for s in runs]))  # noqa: E731
        share = [s["met_of_reachable"] for s in per_split]
        ratios = [s["mean_tokens"] / point["mean_tokens"] for s in per_split]
        thresholds.append({
            "rule": f"psnr:{target:g}",
            "margin_db": float(np.mean([np.mean(s["margins_db"]) for s in per_split])),
            "margins_db": sorted({m for s in per_split for m in s["margins_db"]}),
            "mean_tokens": mean("mean_tokens"),
            "mean_psnr": mean("mean_psnr"),
            "met": mean("met"),  # averaged over the splits
            "reachable": int(reachable.sum()),
            "met_of_reachable": mean("met_of_reachable"),
            "met_of_reachable_range": [min(share), max(share)],
            "predicted_miss": mean("predicted_miss"),
            "search_met": len(psnr) - point["missed"],
            "search_mean_tokens": point["mean_tokens"],
            "tokens_ratio_vs_search": mean("mean_tokens") / point["mean_tokens"],
            "tokens_ratio_range": [min(ratios), max(ratios)],
            "splits": per_split,
        })  # fmt: skip
    if thresholds:
        met = np.array([[s["met"] for s in t["splits"]] for t in thresholds]).sum(0)  # [splits] over targets
        tok = np.array([[s["mean_tokens"] for s in t["splits"]] for t in thresholds]).sum(0)
        reach, search_tok = sum(t["reachable"] for t in thresholds), sum(t["search_mean_tokens"] for t in thresholds)
        pooled = {
            "met_of_reachable": float((met / reach).mean()),
            "met_of_reachable_range": [float((met / reach).min()), float((met / reach).max())],
            "tokens_ratio_vs_search": float((tok / search_tok).mean()),
            "tokens_ratio_range": [float((tok / search_tok).min()), float((tok / search_tok).max())],
        }
    for lam in SLOPES:
        k, _ = choose_rungs(pred, ladder, Rule("psnr-slope", lam))
        chosen = psnr[rows, np.searchsorted(ladder, k)]
        slopes.append(
            {"rule": f"psnr-slope:{lam:g}", "mean_tokens": float(k.mean()), "mean_psnr": float(chosen.mean())}
        )
    err = pred - psnr
    return {
        "rmse_db": np.sqrt((err**2).mean(axis=0)).round(3).tolist(),
        "bias_db": err.mean(axis=0).round(3).tolist(),  # predicted - decoded, per rung
        "splits": splits if calibration_folds else 1,
        "threshold": thresholds,
        "threshold_pooled": pooled if thresholds else None,
        "slope": slopes,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = sorted(results["fixed"], key=lambda r: r["k"])
    ax.plot([r["k"] for r in fixed], [r["mean_psnr"] for r in fixed], "o-", color="gray", label="fixed k")
    for name, marker in (("psnr", "s"), ("inception", "^"), ("psnr-slope", "P-")):
        pts = sorted((p for p in results["adaptive"] if p["criterion"] == name), key=lambda p: p["mean_tokens"])
        if pts:
            ax.plot([p["mean_tokens"] for p in pts], [p["mean_psnr"] for p in pts], marker, label=f"search ({name})")
            for p in pts:
                ax.annotate(f"{p['target']:g}", (p["mean_tokens"], p["mean_psnr"]), fontsize=7)
    predicted = results.get("length_predictor") or {}
    for name, marker in (("threshold", "D"), ("slope", "v")):
        pts = predicted.get(name, [])
        if pts:
            xs, ys = [p["mean_tokens"] for p in pts], [p["mean_psnr"] for p in pts]
            ax.plot(xs, ys, marker, label=f"length predictor ({name})")
    oracle = results.get("equal_slope_oracle") or []
    if oracle:
        ax.plot([p["mean_tokens"] for p in oracle], [p["mean_psnr"] for p in oracle], ".:", label="equal-slope oracle")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean tokens per image")
    ax.set_ylabel("mean PSNR (dB)")
    ax.set_title(f"{results['photos']} held-out photos, {results['timesteps']} decoder steps")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    shared = Path(os.environ.get("FLEXTOK_SHARED", REPO.parent / "shared"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models" / "flextok-small"))
    p.add_argument("--images", default=str(shared / "data" / "imagenet-sample"), help="photo folder")
    p.add_argument("--list", default=str(REPO / "models" / "flextok-small" / "heldout.csv"), help="CSV of photos")
    p.add_argument("--output", default="out/adaptive", help="folder for results.json and rate.png")
    p.add_argument("--ladder", help="comma-separated k's (default: powers of two up to the registers)")
    p.add_argument("--targets", help="PSNR targets in dB, comma-separated (default: k=max's mean -4,-2,-1,0,+1)")
    p.add_argument("--inception", help="also Inception cosine-distance targets, comma-separated (slow on CPU)")
    p.add_argument(
        "--live",
        help="run this target's search for real (mixed-k decodes) and compare with the replay: a PSNR "
        "value, CRITERION:TARGET (e.g. psnr-slope:0.1), or 'auto' (the middle PSNR target)",
    )
    p.add_argument(
        "--slopes",
        default=",".join(map(str, SLOPES)),
        help="LAMBDAs (dB per token) of the psnr-slope searches to replay ('' for none)",
    )
    p.add_argument("--timesteps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--limit", type=int, help="first N photos only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-predictor", help="also score this length predictor's picks (zero decodes)")
    p.add_argument(
        "--calibration-folds",
        type=int,
        default=0,
        help="K > 0: the predictor's threshold margins cross-fitted K-fold on these photos (for a predictor "
        "calibrated on them); 0: its own margins (default)",
    )
    p.add_argument(
        "--calibration-splits",
        type=int,
        default=20,
        help="with --calibration-folds: average the threshold figures over this many random fold assignments",
    )
    p.add_argument(
        "--views",
        default="0",
        help="augmentation ids per photo, one table row each (pipeline.data.preprocess numbering: 0 the center "
        "crop, 2-6 the ten-crop crops); default 0. The length predictor's training table: 0,2,3,4,5,6",
    )
    p.add_argument("--table-only", action="store_true", help="only decode every rung and save table.npz")
    p.add_argument(
        "--reuse-table",
        action="store_true",
        help="take step 1 from OUTPUT/table.npz when it holds the same photos and views, ladder, seeds and decoding "
        "(and the Inception table, with --inception)",
    )
    args = p.parse_args()
    if args.calibration_folds < 0 or args.calibration_folds == 1:
        p.error("--calibration-folds: 0 (the predictor's own margins) or K >= 2")
    if args.calibration_splits < 1:
        p.error("--calibration-splits must be >= 1")
    try:
        views = tuple(int(v) for v in args.views.split(","))
    except ValueError:
        p.error(f"--views {args.views!r}: comma-separated augmentation ids")
    if not views or len(set(views)) != len(views) or not set(views) <= {0, 1, *AUGMENT_MODES["tencrop"]}:
        p.error(f"--views {args.views!r}: distinct augmentation ids in 0..11")
    if (args.live or "").strip().lower().startswith("inception") and not args.inception:
        p.error("--live inception:... needs --inception (the Inception table to compare with)")

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = FlexTok.from_pretrained(args.model, map_location=device).float().eval()
    with open(args.list, newline="") as f:
        names = [row["file"] for row in csv.DictReader(f)][: args.limit]
    photos, groups, augs = load_views(Path(args.images), names, model.cfg.image_size, views)  # one row per view
    files = [names[g] for g in groups]
    ladder = parse_ladder(args.ladder, model.num_registers)
    dec = Decoding(timesteps=args.timesteps, guidance_scale=args.guidance_scale)
    seeds = [args.seed + g for g in groups]  # a photo's views decode from its noise
    scorers = [PSNRScorer()]
    if args.inception:
        scorers.append(make_scorer(Criterion("inception", 0.0), device=device))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.reuse_table and same_table(out / "table.npz", files, augs, ladder, seeds, dec, bool(args.inception)):
        saved = np.load(out / "table.npz")
        tokens, psnr = torch.as_tensor(saved["tokens"]).to(model.device), saved["psnr"]
        tables = [psnr] + ([saved["inception"]] if args.inception else [])
        print(f"every rung: reused {out / 'table.npz'}")
    else:
        log = lambda m: print(m, flush=True)  # noqa: E731
        tokens, tables, _ = score_every_k(model, photos, ladder, scorers, seeds, dec, log=log)
        psnr = tables[0]
        print(f"every rung decoded in {time.perf_counter() - start:.0f} s")
    np.savez(
        out / "table.npz",
        files=np.array(files),  # [N] a row's photo
        augs=np.array(augs),  # [N] its view (augmentation id)
        groups=np.array(groups),  # [N] its photo's index: rows of one photo share a cross-fitting fold
        tokens=tokens.cpu().numpy().astype(np.int64),  # [N, registers]
        ladder=np.array(ladder),
        psnr=psnr,  # [N, L] dB at every rung
        **({"inception": tables[1]} if args.inception else {}),  # [N, L] Inception cosine distance
        seeds=np.array(seeds),
        timesteps=args.timesteps,
        guidance_scale=args.guidance_scale,
    )
    print(f"-> {out / 'table.npz'}")
    if args.table_only:
        return

    mean_max = float(psnr[:, -1].mean())
    targets = (
        [float(t) for t in args.targets.split(",")]
        if args.targets
        else [round(2 * (mean_max + d)) / 2 for d in (-4, -2, -1, 0, 1)]
    )
    criteria = [Criterion("psnr", t) for t in targets]
    if args.inception:
        criteria += [Criterion("inception", float(t)) for t in args.inception.split(",")]
    criteria += [Criterion("psnr-slope", float(lam)) for lam in args.slopes.split(",") if lam.strip()]
    adaptive = []
    for c in criteria:
        table = tables[SCORES.index(c.score_name)]
        adaptive.append(adaptive_point(psnr, table, ladder, c))
        if args.inception:  # the chosen reconstructions' Inception distance, for every criterion
            cols = np.searchsorted(ladder, adaptive[-1]["k"])
            adaptive[-1]["mean_inception"] = float(tables[1][np.arange(len(photos)), cols].mean())

    oracle = equal_slope_points(psnr, ladder, SLOPES)
    predicted = None
    if args.length_predictor:
        predicted = predictor_points(
            LengthPredictor.load(args.length_predictor),
            tokens,
            psnr,
            ladder,
            adaptive,
            args.calibration_folds,
            args.calibration_splits,
        )

    # Fixed k at every rung, then at round(mean tokens) of each other point (same photos, same noise).
    fixed = {k: float(psnr[:, j].mean()) for j, k in enumerate(ladder)}
    fixed_inception = {k: float(tables[1][:, j].mean()) for j, k in enumerate(ladder)} if args.inception else {}
    inception_refs = scorers[1].prepare(photos) if args.inception else None
    noise = image_noise(model, seeds)
    idx = np.arange(len(photos))
    others = oracle + (predicted["threshold"] + predicted["slope"] if predicted else [])
    for point in adaptive + others:
        k = int(round(point["mean_tokens"]))
        if k not in fixed:
            recon = decode_prefixes(model, tokens, idx, np.full(len(photos), k), noise, dec)
            fixed[k] = float(PSNRScorer()(photos, recon).mean())
            if args.inception:
                fixed_inception[k] = float(scorers[1](inception_refs, recon).mean())
        point["fixed_k_equal_tokens"] = k
        point["fixed_psnr_equal_tokens"] = fixed[k]
        point["gain_db_vs_fixed_equal_tokens"] = point["mean_psnr"] - fixed[k]
        if "mean_inception" in point:
            point["fixed_inception_equal_tokens"] = fixed_inception[k]
    for point in adaptive:
        point["gap_db_vs_fixed_max"] = fixed[ladder[-1]] - point["mean_psnr"]
        point["tokens_ratio_vs_fixed_max"] = point["mean_tokens"] / ladder[-1]
        point["goal_met"] = point["gap_db_vs_fixed_max"] <= 0.5 and point["tokens_ratio_vs_fixed_max"] <= 0.6

    live = None
    if args.live is not None:
        if args.live == "auto":
            crit = Criterion("psnr", targets[len(targets) // 2])
        else:
            crit = parse_adaptive(args.live if ":" in args.live else f"psnr:{args.live}")
        t0 = time.perf_counter()
        scorer, table = scorers[SCORES.index(crit.score_name)], tables[SCORES.index(crit.score_name)]
        _, result = search_lengths(model, photos, crit, ladder, scorer, seeds, dec, tokens=tokens)
        replayed = replay(table, ladder, crit)
        live = {
            "target": str(crit),
            "seconds": time.perf_counter() - t0,
            "same_k": int((result.k == replayed.k).sum()),
            "decodes_total": int(result.decodes.sum()),
            "decodes_max": int(result.decodes.max()),
            "mean_tokens": float(result.k.mean()),
            "missed": int(result.missed.sum()),
        }

    results = {
        "model": args.model,
        "photos": len(photos),
        "timesteps": args.timesteps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "ladder": ladder,
        "decode_bound_per_image": max_decodes(len(ladder)),
        "decode_bound_per_image_slope": max_decodes(len(ladder), Criterion("psnr-slope", 1.0)),
        "non_monotone_psnr": {
            "any_drop": int(non_monotone(psnr, Criterion("psnr", 0)).sum()),
            "drop_over_0.5dB": int(non_monotone(psnr, Criterion("psnr", 0), 0.5).sum()),
        },
        "psnr_table": np.round(psnr, 3).tolist(),
        "fixed": [
            {
                "k": k,
                "mean_tokens": k,
                "mean_psnr": v,
                **({"mean_inception": fixed_inception[k]} if args.inception else {}),
            }
            for k, v in sorted(fixed.items())
        ],
        "adaptive": adaptive,
        "equal_slope_oracle": oracle,
        "length_predictor": predicted
        and {"path": args.length_predictor, "calibration_folds": args.calibration_folds, **predicted},
        "live_search": live,
    }
    if args.inception:
        results["non_monotone_inception"] = {"any_rise": int(non_monotone(tables[1], Criterion("inception", 0)).sum())}
        results["inception_table"] = np.round(tables[1], 5).tolist()
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "rate.png")

    print(
        f"{args.model}: {len(photos)} photos, ladder {ladder}, {args.timesteps} steps, guidance {args.guidance_scale}"
    )
    nm = results["non_monotone_psnr"]
    print(f"PSNR not monotone in k: {nm['any_drop']}/{len(photos)} photos ({nm['drop_over_0.5dB']} by > 0.5 dB)")
    inc = " Inception distance |" if args.inception else ""
    print(f"| fixed k | mean PSNR |{inc}\n|---:|---:|" + ("---:|" if args.inception else ""))
    for r in results["fixed"]:
        print(f"| {r['k']} | {r['mean_psnr']:.2f} |" + (f" {r['mean_inception']:.4f} |" if args.inception else ""))
    print(
        "\n| target | mean tokens | mean PSNR | fixed k (equal tokens) | its PSNR | search - fixed | missed | "
        "decodes max (bound) | differs from exhaustive | goal |"
        + (" mean Inception distance | fixed k's |" if args.inception else "")
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if args.inception else ""))
    for a in adaptive:
        print(
            f"| {a['criterion']}:{a['target']:g} | {a['mean_tokens']:.2f} | {a['mean_psnr']:.2f} | "
            f"{a['fixed_k_equal_tokens']} | {a['fixed_psnr_equal_tokens']:.2f} | "
            f"{a['gain_db_vs_fixed_equal_tokens']:+.2f} | {a['missed']} | {a['decodes_max']} ({a['decode_bound']}) | "
            f"{a['differs_from_exhaustive']} | {'yes' if a['goal_met'] else 'no'} |"
            + (
                f" {a['mean_inception']:.4f} | {a['fixed_inception_equal_tokens']:.4f} |"
                if "mean_inception" in a
                else ""
            )
        )
    print(
        "\n| equal-slope oracle | mean tokens | mean PSNR | fixed k (equal tokens) | its PSNR |\n"
        "|---|---:|---:|---:|---:|"
    )
    for o in oracle:
        print(
            f"| lambda {o['lambda']:g} | {o['mean_tokens']:.2f} | {o['mean_psnr']:.2f} | {o['fixed_k_equal_tokens']} | "
            f"{o['fixed_psnr_equal_tokens']:.2f} |"
        )
    if predicted:
        print(f"\nlength predictor {args.length_predictor}: held-out RMSE per rung {predicted['rmse_db']} dB, bias "
              f"(predicted - decoded) {predicted['bias_db']} dB")  # fmt: skip
        print(
            "| rule | margin | mean tokens | search's | ratio | met / reachable | search met | mean PSNR | fixed k "
            "| its PSNR |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in predicted["threshold"]:
            print(
                f"| {t['rule']} | {t['margin_db']:.2f} | {t['mean_tokens']:.2f} | {t['search_mean_tokens']:.2f} | "
                f"{t['tokens_ratio_vs_search']:.2f} "
                f"({t['tokens_ratio_range'][0]:.2f}-{t['tokens_ratio_range'][1]:.2f}) | "
                f"{t['met']:.1f}/{t['reachable']} ({t['met_of_reachable']:.1%}; "
                f"{t['met_of_reachable_range'][0]:.0%}-{t['met_of_reachable_range'][1]:.0%}) | {t['search_met']} | "
                f"{t['mean_psnr']:.2f} | {t['fixed_k_equal_tokens']} | {t['fixed_psnr_equal_tokens']:.2f} |"
            )
        pooled = predicted["threshold_pooled"]
        if pooled:
            print(
                f"| pooled over targets ({predicted['splits']} fold splits) | | | | "
                f"{pooled['tokens_ratio_vs_search']:.3f} ({pooled['tokens_ratio_range'][0]:.3f}-"
                f"{pooled['tokens_ratio_range'][1]:.3f}) | {pooled['met_of_reachable']:.1%} "
                f"({pooled['met_of_reachable_range'][0]:.1%}-{pooled['met_of_reachable_range'][1]:.1%}) | | | | |"
            )
        for t in predicted["slope"]:
            print(
                f"| {t['rule']} | | {t['mean_tokens']:.2f} | | | | | {t['mean_psnr']:.2f} | "
                f"{t['fixed_k_equal_tokens']} | {t['fixed_psnr_equal_tokens']:.2f} |"
            )
    if live:
        print(
            f"\nlive search {live['target']}: same k as the replay for {live['same_k']}/{len(photos)} photos, "
            f"{live['decodes_total']} decodes (max {live['decodes_max']} per photo)"
        )
    print(f"-> {out / 'results.json'}, {out / 'rate.png'}")


if __name__ == "__main__":
    main()
