"""Length predictor: an image's quality curve (PSNR at each ladder rung) from its tokens, with no decoder call.

    predictor = LengthPredictor.load("runs/length-predictor")      # config.json + model.safetensors
    curve = predictor.predict(tokens)                              # tokens [N, n] -> predicted PSNR [N, L]
    k, missed = predictor.choose(tokens, parse_rule("psnr:15.5"))  # or "psnr-slope:0.1"

The head reads what the encoder already computed: each register's FSQ code (the token id unpacked into its 6
quantized values, [n, 6]), flattened in register order, through a two-layer MLP. The curve it outputs is
monotone by construction (PSNR at the first rung, then non-negative steps), the shape quality has on average.

From a predicted curve a rule picks each image's k with zero decodes:
- `psnr:TARGET`: the smallest rung whose predicted PSNR minus a margin meets the target (the largest rung,
  counted as missed, when none does). The margin is calibrated per target on calibration photos' predicted and
  decoded curves (kept in the file; photos the tokenizer never trained on, or else the training photos'
  out-of-fold curves): the smallest that makes >= `coverage` of the photos that can meet the target at some rung
  meet it at the chosen k, with split conformal prediction's finite-sample correction (calibrated_margin).
- `psnr-slope:LAMBDA`: the rung maximising predicted PSNR - LAMBDA * k (tokens go where they buy the most dB).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flextok.errors import SettingError
from flextok.fsq import FSQ

from .adaptive import parse_adaptive

FORMAT = "flextok-length-predictor"
RULES = ("psnr", "psnr-slope")
CONFIG, WEIGHTS = "config.json", "model.safetensors"


@dataclass(frozen=True)
class PredictorConfig:
    ladder: tuple[int, ...]  # the rungs it predicts PSNR at, e.g. (1, 2, 4, 8, 16, 32)
    num_registers: int  # tokens per image of the tokenizer it was trained for
    fsq_levels: tuple[int, ...]  # that tokenizer's FSQ levels (token id -> codes)
    tokenizer_sha256: str = ""  # flextok.checkpoint digest of that tokenizer ("" = not checked)
    hidden: int = 32  # MLP width; 0: a linear head on the codes
    coverage: float = 0.9  # psnr:TARGET margin: share of reachable photos that must meet the target
    decoding: str = ""  # decoder settings of the training curves, e.g. "timesteps=25,guidance_scale=1"


@dataclass(frozen=True)
class Rule:
    """`psnr`: threshold, value = target dB; `psnr-slope`: equal slope, value = LAMBDA dB per token."""

    name: str
    value: float

    def __str__(self) -> str:
        return f"{self.name}:{self.value:g}"


def parse_rule(text: str) -> Rule:
    """'psnr:15.5' | 'psnr-slope:0.1' -> Rule; a ValueError with a one-line reason otherwise."""
    name, sep, value = str(text).partition(":")
    name = name.strip().lower()
    if name == "psnr-slope":
        try:
            lam = float(value)
        except ValueError:
            raise SettingError(f"adaptive {text!r}: LAMBDA {value!r} is not a number", "adaptive") from None
        if not (math.isfinite(lam) and lam >= 0):
            raise SettingError(f"adaptive {text!r}: LAMBDA (dB per token) must be finite and >= 0", "adaptive")
        return Rule(name, lam)
    if name != "psnr":
        raise SettingError(f"adaptive {text!r}: a length predictor takes psnr:TARGET or psnr-slope:LAMBDA", "adaptive")
    return Rule("psnr", parse_adaptive(text).target)


class LengthPredictor(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.fsq = FSQ(cfg.fsq_levels)
        L = len(cfg.ladder)
        d = cfg.num_registers * self.fsq.dim
        if cfg.hidden:
            self.head = nn.Sequential(nn.Linear(d, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, L))
        else:
            self.head = nn.Sequential(nn.Linear(d, L))
        self.register_buffer("offset", torch.zeros(L))  # [L] first-rung PSNR and step sizes of the mean curve
        # Predicted and decoded PSNR of the calibration photos, [M, L] each: the threshold's calibration.
        self.register_buffer("calib_pred", torch.zeros(0, L))
        self.register_buffer("calib_psnr", torch.zeros(0, L))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] (int) -> predicted PSNR [B, L], non-decreasing along the ladder."""
        codes = self.fsq.indices_to_codes(tokens[:, : self.cfg.num_registers])  # [B, n, 6]
        raw = self.head(codes.flatten(1)) + self.offset  # [B, L]
        steps = nn.functional.softplus(raw[:, 1:])  # [B, L-1] >= 0
        return torch.cat([raw[:, :1], raw[:, :1] + steps.cumsum(dim=1)], dim=1)

    def init_offset(self, psnr: torch.Tensor) -> None:
        """Start from the mean training curve (psnr [N, L]): the head then learns each image's deviation."""
        mean = psnr.mean(0)
        steps = (mean[1:] - mean[:-1]).clamp_min(1e-3)
        inv_softplus = steps + torch.log(-torch.expm1(-steps))  # softplus^-1
        self.offset.copy_(torch.cat([mean[:1], inv_softplus]))

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """tokens [N, n] -> predicted PSNR [N, L] (numpy, float64)."""
        # np.array copies: arrays Ray hands a worker are read-only, which torch warns about
        tokens = torch.as_tensor(np.array(tokens, np.int64) if isinstance(tokens, np.ndarray) else tokens)
        return self.eval()(tokens.cpu().long()).double().numpy()

    # ------------------------------------------------------------------ choosing k
    def margin(self, target: float) -> float:
        """The threshold margin (dB) for `target` from the calibration curves (calibrated_margin)."""
        pred, true = self.calib_pred.double().numpy(), self.calib_psnr.double().numpy()
        return calibrated_margin(pred, true, target, self.cfg.coverage)

    def choose(self, tokens, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
        """tokens [N, n] -> (k [N] int64 on the ladder, predicted miss [N] bool) with zero decodes."""
        return choose_rungs(self.predict(tokens), self.cfg.ladder, rule, self.margin(rule.value))

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)
        config = {"format": FORMAT, "version": 1, "config": asdict(self.cfg)}
        (folder / CONFIG).write_text(json.dumps(config, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> LengthPredictor:
        cfg = read_config(folder)
        model = cls(cfg)
        state = load_file(Path(folder) / WEIGHTS)
        for name in ("calib_pred", "calib_psnr"):  # their number of rows is the training set's
            if name in state:
                model.register_buffer(name, torch.zeros_like(state[name]))
        model.load_state_dict(state, strict=True)
        return model.eval()


def read_config(folder: str | Path) -> PredictorConfig:
    """config.json of a saved predictor, with only the known keys (an allowlist); ValueError otherwise."""
    path = Path(folder) / CONFIG
    if not path.is_file() or not (Path(folder) / WEIGHTS).is_file():
        raise ValueError(f"{folder}: not a length predictor folder (needs {CONFIG} and {WEIGHTS})")
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("config"), dict):
        raise ValueError(f"{path}: not a length predictor config (format {FORMAT!r})")
    known = {f.name for f in fields(PredictorConfig)}
    extra = sorted(set(raw["config"]) - known)
    if extra:
        raise ValueError(f"{path}: unknown keys {extra}")
    values = dict(raw["config"])
    values["ladder"] = tuple(int(k) for k in values["ladder"])
    values["fsq_levels"] = tuple(int(v) for v in values["fsq_levels"])
    return PredictorConfig(**values)


def predictor_digest(folder: str | Path) -> str:
    """sha256 over the predictor's config.json and model.safetensors bytes."""
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()


def calibrated_margin(pred: np.ndarray, true: np.ndarray, target: float, coverage: float) -> float:
    """Calibration photos' predicted and decoded curves [M, L] -> the smallest margin (dB, 0.05 steps) that makes
    the photos that can meet the target (at some rung) meet it at the rung the threshold rule picks, in a share
    of at least min(1, ceil((R + 1) * coverage) / R) of those R photos: split conformal prediction's finite-sample
    correction, so that on new photos like these the share is at least `coverage` in expectation (the plain share
    fell short by 2-5 points on held-out photos, docs/adaptive.md). 0 when no photo can; 20 dB when none does."""
    reachable = (true >= target).any(axis=1)
    r = int(reachable.sum())
    if r == 0:
        return 0.0
    need = min(1.0, math.ceil((r + 1) * coverage - 1e-9) / r)
    rows = np.arange(len(true))
    for margin in np.arange(0.0, 20.0 + 1e-9, 0.05):
        cols = threshold_rungs(pred - margin, target)
        if (true[rows, cols] >= target)[reachable].mean() >= need - 1e-12:
            return float(round(margin, 2))
    return 20.0


def threshold_rungs(curve: np.ndarray, target: float) -> np.ndarray:
    """curve [N, L] -> [N] the first rung index whose value >= target, else the last."""
    met = curve >= target
    return np.where(met.any(axis=1), met.argmax(axis=1), curve.shape[1] - 1)


def choose_rungs(curve: np.ndarray, ladder, rule: Rule, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A (predicted or decoded) PSNR curve [N, L] -> (k [N], missed [N]) under a rule; `margin` (dB) is taken
    off the curve for `psnr`. `psnr-slope` never misses: it has no target."""
    ks = np.asarray(ladder, np.int64)
    if rule.name == "psnr":
        cols = threshold_rungs(curve - margin, rule.value)
        return ks[cols], ~((curve - margin) >= rule.value).any(axis=1)
    if rule.name == "psnr-slope":
        cols = np.argmax(curve - rule.value * ks[None].astype(np.float64), axis=1)
        return ks[cols], np.zeros(len(curve), bool)
    raise ValueError(f"unknown rule {rule.name!r} (one of {RULES})")
