"""Train a length predictor: tokens -> PSNR at each ladder rung, for `pretokenize --length-predictor`.

    python bench/adaptive.py --list models/flextok-small/train.csv --table-only --output out/adaptive-train
    flextok train length-predictor --model models/flextok-small --table out/adaptive-train/table.npz \
        --output runs/length-predictor

The table (bench/adaptive.py's table.npz) holds each training photo's tokens and its decoded PSNR at every
rung; the model must be the tokenizer that made those tokens (its digest goes into the predictor's config).
A plain torch loop on the CPU (pipeline.train.length_predictor), seconds for 200 photos. Details:
docs/adaptive.md, section "Length predictor".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.common import fail, parse_args, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_length_predictor", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the tokenizer the table's tokens come from (required)")
    p.add_argument("--table", help="table.npz from bench/adaptive.py --table-only (required)")
    p.add_argument("--output", help="folder for config.json + model.safetensors (required)")
    p.add_argument("--hidden", type=int, default=32, help="MLP width (default 32); 0: a linear head")
    p.add_argument("--coverage", type=float, default=0.9, help="psnr:TARGET margin's share of photos (0.9)")
    p.add_argument("--steps", type=int, default=1500, help="full-batch AdamW steps (default 1500)")
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
    if not 0 < args.coverage <= 1 or args.folds < 2 or args.steps < 1 or args.hidden < 0:
        fail("need 0 < --coverage <= 1, --folds >= 2, --steps >= 1, --hidden >= 0")
    import numpy as np

    from flextok.checkpoint import read_checkpoint_info
    from pipeline.data.length_predictor import PredictorConfig
    from pipeline.train.length_predictor import FitConfig, fit_length_predictor

    try:
        info = read_checkpoint_info(args.model)
        digest = info.digest()
    except (OSError, ValueError) as e:
        fail(f"--model {args.model}: {e}")
    if not Path(args.table).is_file():
        fail(f"--table {args.table}: not found")
    table = np.load(args.table, allow_pickle=False)
    tokens, psnr, ladder = table["tokens"], table["psnr"], [int(k) for k in table["ladder"]]
    if tokens.shape[1] != info.cfg.num_registers or ladder[-1] > info.cfg.num_registers:
        fail(f"--table {args.table}: {tokens.shape[1]} tokens per photo, the model makes {info.cfg.num_registers}")
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
    predictor, report = fit_length_predictor(tokens, psnr, cfg, fit)
    predictor.save(args.output)
    (Path(args.output) / "fit.json").write_text(json.dumps({"table": args.table, **report}, indent=1) + "\n")
    print(f"length predictor: {report['photos']} photos, ladder {ladder}")
    for name in ("rmse_in_sample_db", "rmse_out_of_fold_db", "rmse_mean_curve_db"):
        print(f"  {name}: {report[name]}")
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
