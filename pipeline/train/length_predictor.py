"""Fit a length predictor (pipeline.data.length_predictor) to decoded quality curves, on Ray Train.

    train = Table(tokens, psnr)                                    # tokens [N, n], PSNR per rung [N, L]
    predictor, report = fit_on_ray_train(train, cfg, FitConfig(), workers=2, storage="/tmp/runs")
    predictor, report = fit_length_predictor(train, cfg, FitConfig())       # the same fits, in process

The data is small (one row per training photo: its tokens [n] and its PSNR at every rung [L]), so each fit is
`steps` full-batch Adam steps on the mean squared error in dB plus `l2` times the squared head weights (ridge:
with 200 photos and 192 inputs an unpenalised head fits the photos and not the trend). A predictor takes
`folds` + 1 fits: one per cross-fitting fold (its photos' out-of-fold curves, for the fit report and, without a
calibration table, the threshold margin) and the final one on every photo. Those fits are independent, so Ray
Train spreads them over its workers (fit p runs on worker p % workers) and gathers them on rank 0, which builds
the predictor and reports it as the run's checkpoint. Each fit is seeded alone, so the worker count changes
nothing but the time.

Calibration (pipeline.data.length_predictor.LengthPredictor.margin): photos the tokenizer never trained on, when
given (their tokens and decoded curves, e.g. the held-out photos' table), else the out-of-fold curves of the
training photos; the latter are optimistic when the tokenizer trained on those photos (docs/adaptive.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.length_predictor import LengthPredictor, PredictorConfig

REPORT = "fit.json"  # the fit report, beside the predictor's files in the checkpoint


@dataclass(frozen=True)
class FitConfig:
    steps: int = 1500  # full-batch Adam steps
    lr: float = 1e-2
    l2: float = 0.1  # penalty on the squared weights of the head's matrices
    folds: int = 5  # cross-fitting folds for the out-of-fold curves
    seed: int = 0


@dataclass(frozen=True)
class Table:
    """Rows' tokens [N, n] (int) and their decoded PSNR at every ladder rung [N, L] (dB). A row is a photo or one
    view of it (a crop); `groups` [N] names each row's photo, so that a photo's views share a cross-fitting fold
    (None: every row its own photo)."""

    tokens: np.ndarray
    psnr: np.ndarray
    groups: np.ndarray | None = None

    @property
    def photos(self) -> int:
        return len(self.psnr) if self.groups is None else len(np.unique(self.groups))


def fit_once(tokens: torch.Tensor, psnr: torch.Tensor, cfg: PredictorConfig, fit: FitConfig) -> LengthPredictor:
    """tokens [N, n] int64, psnr [N, L] float32 -> a trained predictor (no calibration)."""
    torch.manual_seed(fit.seed)
    model = LengthPredictor(cfg)
    model.init_offset(psnr)
    opt = torch.optim.Adam(model.head.parameters(), lr=fit.lr)
    matrices = [p for p in model.head.parameters() if p.ndim == 2]
    model.train()
    for _ in range(fit.steps):
        loss = torch.nn.functional.mse_loss(model(tokens), psnr) + fit.l2 * sum(w.square().sum() for w in matrices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def fold_of_each_row(train: Table, fit: FitConfig) -> np.ndarray:
    """[N] the cross-fitting fold of each row (seeded): photos are dealt to folds, a photo's rows follow it."""
    groups = np.arange(len(train.psnr)) if train.groups is None else np.asarray(train.groups)
    photos, row_photo = np.unique(groups, return_inverse=True)  # row_photo [N] in 0..P-1
    return (np.random.default_rng(fit.seed).permutation(len(photos)) % fit.folds)[row_photo]


def fit_part(train: Table, part: int, cfg: PredictorConfig, fit: FitConfig) -> Any:
    """Part p < folds: fold p's out-of-fold curves [N_p, L] (float64); part == folds: the final model's
    state dict (fitted on every photo)."""
    x = torch.tensor(np.asarray(train.tokens), dtype=torch.int64)  # a copy: Ray hands workers read-only arrays
    y = torch.tensor(np.asarray(train.psnr), dtype=torch.float32)
    if part == fit.folds:
        return fit_once(x, y, cfg, fit).state_dict()
    held = torch.as_tensor(fold_of_each_row(train, fit) == part)
    return fit_once(x[~held], y[~held], cfg, fit).predict(x[held])


def assemble(
    train: Table, parts: dict[int, Any], cfg: PredictorConfig, fit: FitConfig, calibration: Table | None
) -> tuple[LengthPredictor, dict]:
    """The fits' results -> (predictor with its calibration curves, a report: RMSE per rung in dB, in sample,
    out of fold, the mean curve's for comparison, and on the calibration photos when given)."""
    truth = np.asarray(train.psnr, np.float64)
    folds = fold_of_each_row(train, fit)
    oof = np.zeros(truth.shape)  # [N, L]
    for f in range(fit.folds):
        oof[folds == f] = parts[f]
    model = LengthPredictor(cfg)
    model.load_state_dict(parts[fit.folds])
    model.eval()

    def rmse(pred: np.ndarray, true: np.ndarray) -> list[float]:
        return np.sqrt(((pred - true) ** 2).mean(axis=0)).round(3).tolist()

    report = {
        "photos": train.photos,
        "rows": len(truth),
        "rmse_in_sample_db": rmse(model.predict(train.tokens), truth),
        "rmse_out_of_fold_db": rmse(oof, truth),
        "rmse_mean_curve_db": rmse(np.broadcast_to(truth.mean(axis=0), truth.shape), truth),
    }
    if calibration is None:
        calib_pred, calib_true = oof, truth
        report["calibration"] = f"out-of-fold curves of the {len(truth)} training rows"
    else:
        calib_pred, calib_true = model.predict(calibration.tokens), np.asarray(calibration.psnr, np.float64)
        report["calibration"] = f"{len(calib_true)} photos of the calibration table"
        report["rmse_calibration_db"] = rmse(calib_pred, calib_true)
        report["bias_calibration_db"] = (calib_pred - calib_true).mean(axis=0).round(3).tolist()
    model.register_buffer("calib_pred", torch.as_tensor(calib_pred, dtype=torch.float32))
    model.register_buffer("calib_psnr", torch.as_tensor(calib_true, dtype=torch.float32))
    return model, report


def fit_length_predictor(
    train: Table, cfg: PredictorConfig, fit: FitConfig, calibration: Table | None = None
) -> tuple[LengthPredictor, dict]:
    """Every fit in this process, one after another (tests, notebooks); see fit_on_ray_train."""
    parts = {p: fit_part(train, p, cfg, fit) for p in range(fit.folds + 1)}
    return assemble(train, parts, cfg, fit, calibration)


# ---------------------------------------------------------------------------------------------------
# On Ray Train
# ---------------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """Fit parts rank, rank + world, ...; rank 0 gathers every part and reports the predictor as a checkpoint."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train, cfg, fit = config["train"], config["cfg"], config["fit"]
    mine = {p: fit_part(train, p, cfg, fit) for p in range(rank, fit.folds + 1, world)}
    gathered = [None] * world
    if world > 1:
        dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    else:
        gathered = [mine]
    if rank != 0:
        ray.train.report({"parts": len(mine)})
        return
    parts = {p: result for results in gathered for p, result in results.items()}
    predictor, report = assemble(train, parts, cfg, fit, config["calibration"])
    folder = Path(tempfile.mkdtemp(prefix="length-predictor-"))
    predictor.save(folder)
    (folder / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    metrics = {"parts": len(mine), "rmse_out_of_fold_db": float(np.mean(report["rmse_out_of_fold_db"]))}
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    shutil.rmtree(folder, ignore_errors=True)


def fit_on_ray_train(
    train: Table,
    cfg: PredictorConfig,
    fit: FitConfig,
    workers: int,
    storage: str,
    calibration: Table | None = None,
) -> tuple[LengthPredictor, dict]:
    """Run the fits on `workers` Ray Train CPU workers (Ray must be up); the run's folder is `storage`/fit
    (an absolute local path on a single node, or a URL every node can write). Returns the predictor and the fit
    report, both read from the run's checkpoint."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": train, "cfg": cfg, "fit": fit, "calibration": calibration},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="fit", storage_path=storage),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        return LengthPredictor.load(folder), json.loads((Path(folder) / REPORT).read_text())
