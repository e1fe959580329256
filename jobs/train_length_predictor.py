"""Train a length predictor: tokens -> PSNR at each ladder rung, for `pretokenize --length-predictor`.

    python bench/adaptive.py --list models/flextok-small/train.csv --views 0,2,3,4,5,6 --table-only \
        --output out/adaptive-train-views
    python bench/adaptive.py --table-only --output out/adaptive-heldout        # photos it never trained on
    flextok train length-predictor --model models/flextok-small --table out/adaptive-train-views/table.npz \
        --calibration out/adaptive-heldout/table.npz --output runs/length-predictor-views

The table (bench/adaptive.py's table.npz) holds each row's tokens and its decoded PSNR at every rung; a row is
a training photo or one view (crop) of it, and the table's `groups` keep a photo's rows in one cross-fitting
fold. The model must be the tokenizer that made those tokens (its digest goes into the predictor's config).
`--calibration` is a table of photos the tokenizer did not train on: the psnr:TARGET margin is set on them
(without it, on the training photos' out-of-fold curves, which are optimistic on the tokenizer's own training
photos). The fits run on Ray Train CPU workers (pipeline.train.length_predictor), seconds for 200 photos; the
run's Ray Train folder is OUTPUT/fit. Details: docs/adaptive.md, section "Length predictor".
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from jobs.common import fail, parse_args, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_length_predictor", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the tokenizer the table's tokens come from (required)")
    p.add_argument("--table", help="table.npz from bench/adaptive.py --table-only (required)")
    p.add_argument("--calibration", help="table.npz of photos the tokenizer did not train on: sets the margin")
    p.add_argument("--output", help="local folder for config.json + model.safetensors (required)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train CPU workers the fits are spread over (1)")
    p.add_argument("--hidden", type=int, default=32, help="MLP width (default 32); 0: a linear head")
    p.add_argument("--coverage", type=float, default=0.9, help="psnr:TARGET margin's share of photos (0.9)")
    p.add_argument("--steps", type=int, default=1500, help="full-batch Adam steps (default 1500)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--l2", type=float, default=0.1, help="penalty on the head's squared weights (default 0.1)")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the calibration curves (5)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    for name in ("model", "table", "output"):
        if not getattr(args, name):
            fail(f"--{name} is required")
    if not 0 < args.coverage <= 1 or args.folds < 2 or args.steps < 1 or args.hidden < 0 or args.workers < 1:
        fail("need 0 < --coverage <= 1, --folds >= 2, --steps >= 1, --hidden >= 0, --workers >= 1")
    if "://" in args.output:
        fail(f"--output {args.output}: a local folder (the predictor is read from local folders)")
    from flextok.checkpoint import read_checkpoint_info
    from jobs.resources import init_ray
    from pipeline.data.length_predictor import PredictorConfig
    from pipeline.train.length_predictor import FitConfig, Table, fit_on_ray_train

    try:
        info = read_checkpoint_info(args.model)
        digest = info.digest()
    except (OSError, ValueError) as e:
        fail(f"--model {args.model}: {e}")
    table = read_table(args.table, "--table")
    ladder = [int(k) for k in table["ladder"]]
    train = Table(table["tokens"], table["psnr"], table["groups"] if "groups" in table.files else None)
    if train.tokens.shape[1] != info.cfg.num_registers or ladder[-1] > info.cfg.num_registers:
        n, registers = train.tokens.shape[1], info.cfg.num_registers
        fail(f"--table {args.table}: {n} tokens per photo, the model makes {registers}")
    calibration = None
    if args.calibration:
        calib = read_table(args.calibration, "--calibration")
        if [int(k) for k in calib["ladder"]] != ladder or calib["tokens"].shape[1] != train.tokens.shape[1]:
            fail(f"--calibration {args.calibration}: another ladder or token count than --table's")
        for key in ("timesteps", "guidance_scale"):
            if float(calib[key]) != float(table[key]):
                fail(f"--calibration {args.calibration}: decoded with {key} {calib[key]}, --table with {table[key]}")
        calibration = Table(calib["tokens"], calib["psnr"])
    cfg = PredictorConfig(
        ladder=tuple(ladder),
        num_registers=info.cfg.num_registers,
        fsq_levels=tuple(info.cfg.fsq_levels),
        tokenizer_sha256=digest,
        hidden=args.hidden,
        coverage=args.coverage,
        decoding=f"timesteps={int(table['timesteps'])},guidance_scale={float(table['guidance_scale']):g}",
    )
    fit = FitConfig(steps=args.steps, lr=args.lr, l2=args.l2, folds=args.folds, seed=args.seed)
    output = Path(args.output).resolve()
    shutil.rmtree(output / "fit", ignore_errors=True)  # a rerun fits afresh (seconds), never resumes
    init_ray()
    predictor, report = fit_on_ray_train(train, cfg, fit, args.workers, str(output), calibration)
    predictor.save(output)
    report = {"table": args.table, "calibration_table": args.calibration, "workers": args.workers, **report}
    (output / "fit.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"length predictor: {report['photos']} photos ({report['rows']} rows), ladder {ladder}, "
        f"{args.workers} Ray Train worker(s)"
    )
    print(f"  calibration: {report['calibration']}")
    for name in ("rmse_in_sample_db", "rmse_out_of_fold_db", "rmse_mean_curve_db", "rmse_calibration_db"):
        if name in report:
            print(f"  {name}: {report[name]}")
    print(f"-> {args.output}")
    return 0


def read_table(path: str, flag: str):
    """A bench/adaptive.py table.npz (no pickles), or a one-line error."""
    import numpy as np

    if not Path(path).is_file():
        fail(f"{flag} {path}: not found")
    table = np.load(path, allow_pickle=False)
    missing = {"tokens", "psnr", "ladder", "timesteps", "guidance_scale"} - set(table.files)
    if missing:
        fail(f"{flag} {path}: not a bench/adaptive.py table (missing {sorted(missing)})")
    return table


if __name__ == "__main__":
    raise SystemExit(run_main(main))
