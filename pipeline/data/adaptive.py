"""Adaptive token budgets: per image, the smallest k on a ladder whose reconstruction meets a quality target.

    crit = parse_adaptive("psnr:24")                       # or "inception:0.1" (cosine distance of pool features)
    ladder = default_ladder(model.num_registers)           # [1, 2, 4, ..., n]
    result = search_lengths(model, photos_uint8, crit, ladder, scorer=PSNRScorer())
    result.k, result.missed, result.decodes, result.tried  # [N] chosen k, [N] bool, [N] decodes, per-image {k: score}

The search encodes each image once, then bisects over the ladder in lockstep: every round decodes each unresolved
image's midpoint k in ONE mixed-length detokenize call, always from the image's own initial noise (the same for
every k of an image). For a ladder of L rungs it needs at most ceil(log2(L + 1)) <= ceil(log2 L) + 1 decodes per
image. Bisection assumes quality grows with k. Where it does not, the answer is still a k whose reconstruction
was decoded and met the target (never a guess), but it may not be the smallest such k. An image that misses the
target at the largest k keeps the largest k and is counted in `missed`.

`psnr-slope:LAMBDA` is a target on the gain instead of the level: the first rung after which more tokens buy less
than LAMBDA dB per token. Where PSNR is concave in k this is the rung maximising PSNR(k) - LAMBDA * k, the
equal-slope allocation that maximises mean PSNR at a given mean token count (a threshold does not: it spends the
most tokens on the photos that gain least from them). It bisects over the ladder's gaps, two rungs per gap, the
rungs shared between rounds decoded once (`max_decodes` counts the worst case: 4 for a 6-rung ladder).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flextok.errors import SettingError

from ..image_metrics import pixel_metrics
from ..inception import model_output_to_uint8
from .preprocess import to_model_input

CRITERIA = {"psnr": "higher", "inception": "lower"}  # threshold criteria: how each score meets its target
SLOPE = "psnr-slope"  # a target on PSNR's gain per token (LAMBDA, dB per token) instead of its level


@dataclass(frozen=True)
class Criterion:
    """`psnr`: dB against the input (met when >= target); `inception`: cosine distance between the input's and
    the reconstruction's Inception pool features (met when <= target); `psnr-slope`: stop where PSNR gains less
    than `target` dB per further token."""

    name: str
    target: float

    @property
    def is_slope(self) -> bool:
        return self.name == SLOPE

    @property
    def score_name(self) -> str:
        """What is measured per reconstruction: 'psnr' or 'inception'."""
        return "psnr" if self.is_slope else self.name

    def meets(self, scores: np.ndarray) -> np.ndarray:
        if self.is_slope:
            raise ValueError(f"{self}: a slope target is met by a gain, not a score")
        scores = np.asarray(scores, np.float64)
        return scores >= self.target if CRITERIA[self.name] == "higher" else scores <= self.target

    def __str__(self) -> str:
        return f"{self.name}:{self.target:g}"


def parse_adaptive(text: str) -> Criterion:
    """'psnr:24' | 'inception:0.1' | 'psnr-slope:0.1' -> Criterion; a SettingError (a ValueError) with a one-line
    reason otherwise."""
    name, sep, value = str(text).partition(":")
    name = name.strip().lower()
    if not sep or name not in (*CRITERIA, SLOPE):
        raise SettingError(
            f"adaptive {text!r}: expected CRITERION:TARGET with CRITERION one of {sorted((*CRITERIA, SLOPE))}",
            "adaptive",
        )
    try:
        target = float(value)
    except ValueError:
        raise SettingError(f"adaptive {text!r}: target {value!r} is not a number", "adaptive") from None
    if not math.isfinite(target):
        raise SettingError(f"adaptive {text!r}: target must be finite", "adaptive")
    if name == "psnr" and not 0 < target <= 100:
        raise SettingError(f"adaptive {text!r}: a PSNR target lies in (0, 100] dB", "adaptive")
    if name == "inception" and not 0 <= target <= 2:
        raise SettingError(f"adaptive {text!r}: a cosine distance target lies in [0, 2]", "adaptive")
    if name == SLOPE and not 0 < target <= 100:
        raise SettingError(f"adaptive {text!r}: LAMBDA (dB per token) lies in (0, 100]", "adaptive")
    return Criterion(name, target)


def default_ladder(num_registers: int) -> list[int]:
    """Powers of two up to num_registers, plus num_registers itself if it is not one."""
    ladder = [2**i for i in range(num_registers.bit_length()) if 2**i <= num_registers]
    return ladder if ladder[-1] == num_registers else ladder + [num_registers]


def parse_ladder(text: str | None, num_registers: int) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (strictly increasing, within 1..num_registers); None or '' -> default_ladder."""
    if not text:
        return default_ladder(num_registers)
    try:
        ladder = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise SettingError(f"ladder {text!r}: expected comma-separated integers like 1,2,4,8", "ladder") from None
    if any(b <= a for a, b in zip(ladder, ladder[1:], strict=False)):
        raise SettingError(f"ladder {text!r}: values must be strictly increasing", "ladder")
    if ladder[0] < 1 or ladder[-1] > num_registers:
        raise SettingError(f"ladder {text!r}: values must lie in 1..{num_registers} (the model's registers)", "ladder")
    return ladder


def max_decodes(ladder_len: int, criterion: Criterion | None = None) -> int:
    """The most decodes per image the search can spend on a ladder of L rungs: ceil(log2(L + 1)) (at most
    ceil(log2 L) + 1) for a threshold; for a slope target, that of bisect_slope's best split order (4 for
    6 rungs, 5 for 9: within ceil(log2 L) + 1 for both; 9 for 32 rungs, where it is not)."""
    if criterion is not None and criterion.is_slope:
        return max(1, slope_plan(ladder_len - 1, False, False)[0])
    return math.ceil(math.log2(ladder_len + 1))


@functools.cache
def slope_plan(gaps: int, first_known: bool, last_known: bool) -> tuple[int, int]:
    """(worst-case decodes, which gap to test first) to settle a run of `gaps` ladder gaps whose end rungs are
    already decoded or not. Testing gap m decodes its two rungs unless known; a flat gap leaves the gaps before
    it (rung m now known), a steep one those after it (rung m + 1 known). Minimax over m: a small DP."""
    if gaps == 0:
        return 0, 0
    best = None
    for m in range(gaps):
        new = (not (m == 0 and first_known)) + (not (m == gaps - 1 and last_known))
        cost = new + max(slope_plan(m, first_known, True)[0], slope_plan(gaps - m - 1, True, last_known)[0])
        if best is None or cost < best[0]:
            best = (cost, m)
    return best


# ------------------------------------------------------------------------------------------ bisection
@dataclass
class SearchResult:
    k: np.ndarray  # [N] int64, chosen prefix length
    missed: np.ndarray  # [N] bool, the target was not met even at the largest k
    decodes: np.ndarray  # [N] int64, decoder calls spent on each image
    tried: list[dict[int, float]]  # per image: k -> score, for every k decoded

    @property
    def score(self) -> np.ndarray:
        """[N] the score at the chosen k (always decoded: see bisect_ladder)."""
        return np.array([t[int(k)] for t, k in zip(self.tried, self.k, strict=True)])


# (image indices [M], ks [M]) -> scores [M]: decodes image i's first k tokens and scores it
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def bisect_ladder(num_images: int, ladder: list[int], criterion: Criterion, score: ScoreFn) -> SearchResult:
    """Lockstep bisection for the first rung that meets the target, with 'none' as an extra rung past the end.

    Per image the state is [lo, hi) over rung indices 0..L (L = none met). Each round calls `score` once with
    every unresolved image's midpoint; a met target moves hi down to mid, a miss moves lo up to mid + 1. When
    lo == hi the answer is rung lo, or the last rung (counted as missed) when lo == L. Either way that rung was
    decoded: hi < L was set by a met midpoint, and lo reaches L only after rung L - 1 missed."""
    L = len(ladder)
    lo, hi = np.zeros(num_images, np.int64), np.full(num_images, L, np.int64)
    decodes = np.zeros(num_images, np.int64)
    tried: list[dict[int, float]] = [{} for _ in range(num_images)]
    while (open_ := np.flatnonzero(lo < hi)).size:
        mid = (lo[open_] + hi[open_]) // 2
        ks = np.asarray(ladder, np.int64)[mid]
        scores = np.asarray(score(open_, ks), np.float64)  # [M]
        met = criterion.meets(scores)
        for i, k, s in zip(open_, ks, scores, strict=True):
            tried[i][int(k)] = float(s)
        decodes[open_] += 1
        hi[open_] = np.where(met, mid, hi[open_])
        lo[open_] = np.where(met, lo[open_], mid + 1)
    missed = lo == L
    k = np.asarray(ladder, np.int64)[np.minimum(lo, L - 1)]
    return SearchResult(k=k, missed=missed, decodes=decodes, tried=tried)


def bisect_slope(num_images: int, ladder: list[int], lam: float, score: ScoreFn) -> SearchResult:
    """Lockstep bisection for the first gap of the ladder where PSNR gains less than `lam` dB per token.

    Gap j joins rungs j and j + 1; its gain is (s[j+1] - s[j]) / (k[j+1] - k[j]). Per image the state is [lo, hi)
    over gaps 0..L-1 (L - 1 = no gap is flat: keep the last rung). Each round tests one gap per unresolved image
    (the one `slope_plan` picks: the fewest decodes in the worst case), decoding in ONE `score` call those of its
    two rungs not decoded yet; a flat gap moves hi down to it, a steep one moves lo past it. The answer is rung
    lo: decoded, as hi = lo was set by a flat gap starting there, or lo = mid + 1 after a steep gap ending
    there. Where gains fall with k (PSNR concave in k) this is the rung maximising score - lam * k; where they do
    not, a rung whose gain in was >= lam and whose gain out was < lam."""
    L = len(ladder)
    ks_of = np.asarray(ladder, np.int64)
    lo, hi = np.zeros(num_images, np.int64), np.full(num_images, L - 1, np.int64)
    tried: list[dict[int, float]] = [{} for _ in range(num_images)]
    if L == 1:  # nothing to choose; decode once so the answer's score is known, as for a threshold
        for i, s in enumerate(score(np.arange(num_images), np.full(num_images, ladder[0]))):
            tried[i][ladder[0]] = float(s)
    while (open_ := np.flatnonzero(lo < hi)).size:
        mid = np.array([
            lo[i] + slope_plan(int(hi[i] - lo[i]), ladder[lo[i]] in tried[i], ladder[hi[i]] in tried[i])[1]
            for i in open_
        ])  # fmt: skip
        pairs = zip(open_, mid, strict=True)
        need = [(i, int(k)) for i, j in pairs for k in ks_of[[j, j + 1]] if int(k) not in tried[i]]
        if need:
            idx, ks = np.array([i for i, _ in need]), np.array([k for _, k in need])
            for i, k, s in zip(idx, ks, np.asarray(score(idx, ks), np.float64), strict=True):
                tried[i][int(k)] = float(s)
        gain = np.array([
            (tried[i][int(ks_of[j + 1])] - tried[i][int(ks_of[j])]) / (ks_of[j + 1] - ks_of[j])
            for i, j in zip(open_, mid, strict=True)
        ])  # fmt: skip
        flat = gain < lam
        hi[open_] = np.where(flat, mid, hi[open_])
        lo[open_] = np.where(flat, lo[open_], mid + 1)
    decodes = np.array([len(t) for t in tried], np.int64)
    return SearchResult(k=ks_of[lo], missed=np.zeros(num_images, bool), decodes=decodes, tried=tried)


def search_ladder(num_images: int, ladder: list[int], criterion: Criterion, score: ScoreFn) -> SearchResult:
    """The search for a criterion: bisect_slope for `psnr-slope`, bisect_ladder for a threshold."""
    if criterion.is_slope:
        return bisect_slope(num_images, ladder, criterion.target, score)
    return bisect_ladder(num_images, ladder, criterion, score)


def best_slope(scores: np.ndarray, ladder: list[int], lam: float) -> np.ndarray:
    """Exhaustive equal-slope answer from scores [N, L] at every rung: per image the k maximising
    score - lam * k (the first such rung on a tie). What bisect_slope finds when gains fall with k."""
    ks = np.asarray(ladder, np.int64)
    return ks[np.argmax(np.asarray(scores, np.float64) - lam * ks[None], axis=1)]


def smallest_meeting(scores: np.ndarray, ladder: list[int], criterion: Criterion) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive answer from scores [N, L] at every rung: (smallest k that meets, or the largest; missed [N])."""
    met = criterion.meets(scores)  # [N, L]
    first = np.where(met.any(axis=1), met.argmax(axis=1), len(ladder) - 1)
    return np.asarray(ladder, np.int64)[first], ~met.any(axis=1)


def non_monotone(scores: np.ndarray, criterion: Criterion, tolerance: float = 0.0) -> np.ndarray:
    """[N] bool: the score gets worse by more than `tolerance` somewhere along the ladder (scores [N, L])."""
    step = np.diff(scores, axis=1)
    worse = -step if CRITERIA[criterion.name] == "higher" else step
    return (worse > tolerance).any(axis=1)


# ------------------------------------------------------------------------------------------ scorers
class PSNRScorer:
    """PSNR (dB) of uint8 reconstructions against the uint8 inputs, as pipeline.image_metrics computes it."""

    name = "psnr"

    def prepare(self, photos: np.ndarray) -> np.ndarray:
        return photos  # uint8 [N, R, R, 3]

    def __call__(self, reference: np.ndarray, recon: np.ndarray) -> np.ndarray:
        """reference = prepare(...)[idx], recon uint8 [M, R, R, 3] -> [M] dB."""
        return pixel_metrics(reference, recon)[1]


class InceptionScorer:
    """Cosine distance (1 - cos) between the Inception pool features (pipeline.inception) of input and recon."""

    name = "inception"

    def __init__(self, net):
        self.net = net  # pipeline.inception.Inception

    def features(self, images: np.ndarray) -> np.ndarray:
        pool = self.net(images)["pool"].double()  # [M, 2048]
        return torch.nn.functional.normalize(pool, dim=1).numpy()

    def prepare(self, photos: np.ndarray) -> np.ndarray:
        return self.features(photos)  # [N, 2048], unit length

    def __call__(self, reference: np.ndarray, recon: np.ndarray) -> np.ndarray:
        return 1.0 - (reference * self.features(recon)).sum(axis=1)


def make_scorer(criterion: Criterion, inception_weights: str | None = None, device: str = "cpu"):
    """The scorer for a criterion (Inception weights: the project's converted ones unless a path is given)."""
    if criterion.score_name == "psnr":
        return PSNRScorer()
    from ..inception import Inception, ensure_inception_weights

    return InceptionScorer(Inception(inception_weights or ensure_inception_weights(), device=device))


# ------------------------------------------------------------------------------------------ with a model
def image_noise(model, seeds: list[int]) -> torch.Tensor:
    """Initial decoder noise [N, C, h, w] on the model's device: image i's drawn on the CPU (the same on any
    device) from its own generator seeded with seeds[i]."""
    C, h = model.cfg.vae.latent_channels, model.cfg.latent_size
    draws = [torch.randn((1, C, h, h), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(draws).to(model.device)


@dataclass
class Decoding:
    timesteps: int = 25
    guidance_scale: float = 1.0
    apg: bool = False


def decode_prefixes(model, tokens: torch.Tensor, idx: np.ndarray, ks: np.ndarray, noise: torch.Tensor, dec: Decoding):
    """One mixed-length detokenize call: image idx[j]'s first ks[j] tokens from its noise -> uint8 [M, R, R, 3]."""
    prefixes = [tokens[i, : int(k)] for i, k in zip(idx, ks, strict=True)]
    images = model.detokenize(
        prefixes, timesteps=dec.timesteps, guidance_scale=dec.guidance_scale, apg=dec.apg, noise=noise[idx]
    )
    return model_output_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # [M, R, R, 3]


@torch.no_grad()
def search_lengths(
    model,
    photos: np.ndarray,
    criterion: Criterion,
    ladder: list[int],
    scorer,
    seeds: list[int] | None = None,
    dec: Decoding | None = None,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SearchResult]:
    """uint8 photos [N, R, R, 3] -> (all tokens [N, n] from one encode, the search's result). Image i decodes
    from the noise of seed seeds[i] (default i) at every k."""
    dec = dec or Decoding()
    if tokens is None:
        tokens = model.tokenize(to_model_input(photos).to(model.device))  # [N, n]
    noise = image_noise(model, seeds if seeds is not None else list(range(len(photos))))
    reference = scorer.prepare(photos)

    def score(idx: np.ndarray, ks: np.ndarray) -> np.ndarray:
        return scorer(reference[idx], decode_prefixes(model, tokens, idx, ks, noise, dec))

    return tokens, search_ladder(len(photos), ladder, criterion, score)


@torch.no_grad()
def score_every_k(
    model,
    photos: np.ndarray,
    ladder: list[int],
    scorers: list,
    seeds: list[int] | None = None,
    dec=None,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, list[np.ndarray], dict[int, np.ndarray]]:
    """Decode every rung for every image (same noise per image): (tokens [N, n], per scorer scores [N, L],
    k -> reconstructions uint8 [N, R, R, 3])."""
    dec = dec or Decoding()
    tokens = model.tokenize(to_model_input(photos).to(model.device))
    noise = image_noise(model, seeds if seeds is not None else list(range(len(photos))))
    refs = [s.prepare(photos) for s in scorers]
    idx = np.arange(len(photos))
    scores = [np.zeros((len(photos), len(ladder))) for _ in scorers]
    recons = {}
    for j, k in enumerate(ladder):
        recons[k] = decode_prefixes(model, tokens, idx, np.full(len(photos), k), noise, dec)
        for s, ref, out in zip(scorers, refs, scores, strict=True):
            out[:, j] = s(ref, recons[k])
        if log:
            log(f"k={k}: decoded and scored {len(photos)} images")
    return tokens, scores, recons
