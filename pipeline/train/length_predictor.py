"""Fit a length predictor (pipeline.data.length_predictor) to decoded quality curves: a plain torch loop.

    predictor, report = fit_length_predictor(tokens, psnr, cfg, FitConfig())

The data is small (one row per training photo: its tokens [n] and its PSNR at every rung [L]), so each step
is one full-batch Adam step on the mean squared error in dB plus `l2` times the squared head weights (ridge:
with 200 photos and 192 inputs an unpenalised head fits the photos and not the trend); no Ray Train.
`folds`-fold cross-fitting first gives every training photo an out-of-fold predicted curve, which the predictor
keeps to calibrate its threshold margin (pipeline.data.length_predictor.LengthPredictor.margin); then one
model fits all photos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.length_predictor import LengthPredictor, PredictorConfig


@dataclass(frozen=True)
class FitConfig:
    steps: int = 1500  # full-batch Adam steps
    lr: float = 1e-2
    l2: float = 0.1  # penalty on the squared weights of the head's matrices
    folds: int = 5  # cross-fitting folds for the out-of-fold calibration curves
    seed: int = 0


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


def fit_length_predictor(
    tokens: np.ndarray, psnr: np.ndarray, cfg: PredictorConfig, fit: FitConfig
) -> tuple[LengthPredictor, dict]:
    """tokens [N, n], psnr [N, L] -> (predictor with its out-of-fold calibration curves, a report of the fit:
    RMSE per rung in dB, in-sample and out-of-fold, and the mean curve's RMSE for comparison)."""
    x = torch.as_tensor(np.asarray(tokens, np.int64))
    y = torch.as_tensor(np.asarray(psnr, np.float32))
    folds = np.random.default_rng(fit.seed).permutation(len(x)) % fit.folds  # [N] fold of each photo
    oof = np.zeros(y.shape, np.float64)
    for f in range(fit.folds):
        train, held = folds != f, folds == f
        oof[held] = fit_once(x[train], y[train], cfg, fit).predict(x[held])
    model = fit_once(x, y, cfg, fit)
    model.register_buffer("calib_pred", torch.as_tensor(oof, dtype=torch.float32))
    model.register_buffer("calib_psnr", y.clone())
    truth = y.double().numpy()

    def rmse(pred: np.ndarray) -> list[float]:
        return np.sqrt(((pred - truth) ** 2).mean(axis=0)).round(3).tolist()

    report = {
        "photos": len(x),
        "rmse_in_sample_db": rmse(model.predict(x)),
        "rmse_out_of_fold_db": rmse(oof),
        "rmse_mean_curve_db": rmse(np.broadcast_to(truth.mean(axis=0), truth.shape)),
    }
    return model, report
