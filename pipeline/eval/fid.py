"""Feature statistics that merge exactly, and the metrics computed from them.

    stats = FeatureStats.of(features)                  # [N, D] -> (n, float64 sum, float64 sum of x x^T)
    stats = part_a.merge(part_b)                       # blocks / workers / resumed runs combine exactly
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)

KID, precision/recall and the Inception Score need the features themselves (or logits) and follow
torch-fidelity 0.4.0 (same kernels, neighbourhoods, splits and seeds). Reference statistics are `.npz` files:
ours (mu, sigma, n, extractor identity, preprocessing, optionally features) or ADM's reference batches
(`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma` of the TF Inception pool_3; no identity recorded).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import torch

STATS_FORMAT = "flextok-pipeline/fid-stats/1"


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    """Sufficient statistics of a set of feature vectors; `merge` is exact up to float64 addition."""

    n: int
    sum: np.ndarray  # [D] float64
    outer: np.ndarray  # [D, D] float64, sum over samples of x x^T

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        x = _as_float64(features)  # [N, D]
        return cls(x.shape[0], x.sum(axis=0), x.T @ x)

    def merge(self, other: FeatureStats) -> FeatureStats:
        if self.dim != other.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    def add(self, features: np.ndarray | torch.Tensor) -> None:
        """In place: fold a block of features [N, D] in."""
        x = _as_float64(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, statistics have {self.dim}")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    @property
    def mu(self) -> np.ndarray:
        self._need(1)
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (as numpy.cov): (sum x x^T - n mu mu^T) / (n - 1)."""
        self._need(2)
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def _need(self, n: int) -> None:
        if self.n < n:
            raise ValueError(f"statistics need at least {n} samples, have {self.n}")


def _as_float64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {list(x.shape)}")
    return x.astype(np.float64, copy=False)


def merge_all(parts: list[FeatureStats]) -> FeatureStats:
    if not parts:
        raise ValueError("no statistics to merge")
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


# --------------------------------------------------------------------------------------------- metrics
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with tr((S1 S2)^1/2) = sum sqrt(eig(A S1 A)),
    A = S2^1/2 (symmetric PSD, so eigh; tiny negative eigenvalues from round-off count as 0)."""
    return FrechetReference(mu2, sigma2).distance(mu1, sigma1)


def covariance_factor(features: np.ndarray) -> np.ndarray:
    """F [n, D] with F^T F = the unbiased covariance of the features: (x - mean) / sqrt(n - 1)."""
    x = np.asarray(features, np.float64)
    return (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)


def low_rank_factor(features: np.ndarray | None) -> np.ndarray | None:
    """The covariance factor when it is smaller than the covariance (fewer samples than dimensions), else None."""
    if features is None or len(features) >= np.shape(features)[1]:
        return None
    return covariance_factor(features)


class FrechetReference:
    """The reference side of many FID computations (one per k): S^1/2 is computed once, lazily.

    With a covariance factor F (F^T F = S) of either side and fewer samples n than dimensions, the trace term
    comes from the n x n matrix F S_other F^T instead (its nonzero eigenvalues are those of S^1/2 S_other S^1/2):
    the same value, without a 2048 x 2048 eigendecomposition."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, factor: np.ndarray | None = None):
        self.mu, self.sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0],) * 2:
            raise ValueError(f"mu {list(self.mu.shape)} and sigma {list(self.sigma.shape)} do not fit together")
        self.factor = factor
        self._root: np.ndarray | None = None

    def root(self) -> np.ndarray:
        if self._root is None:
            w, v = np.linalg.eigh(self.sigma)
            self._root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        return self._root

    def distance(self, mu: np.ndarray, sigma: np.ndarray, factor: np.ndarray | None = None) -> float:
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.shape != self.mu.shape or sigma.shape != self.sigma.shape:
            raise ValueError(
                f"mismatched statistics: mu {mu.shape} vs {self.mu.shape}, sigma {sigma.shape} vs {self.sigma.shape}"
            )
        D = mu.shape[0]
        if factor is not None and len(factor) < D:
            m = factor @ self.sigma @ factor.T  # [n, n]
        elif self.factor is not None and len(self.factor) < D:
            m = self.factor @ sigma @ self.factor.T  # [n_ref, n_ref]
        else:
            r = self.root()
            m = r @ sigma @ r  # [D, D]
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + np.trace(self.sigma) - 2 * tr_covmean)


def kernel_inception_distance(
    fake: np.ndarray, real: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> dict[str, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel over random subsets (torch-fidelity's defaults).
    The subset size shrinks to the smaller set when there are fewer samples; the result says which."""
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    m = min(subset_size, len(fake), len(real))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(fake)} and {len(real)}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        mmds[i] = _mmd2_poly(x, y)
    return {"kid_mean": float(mmds.mean()), "kid_std": float(mmds.std()), "kid_subset_size": m}


def _mmd2_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m = x.shape[0]
    off_xx = kxx.sum() - np.trace(kxx)
    off_yy = kyy.sum() - np.trace(kyy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def precision_recall(fake: np.ndarray, real: np.ndarray, neighborhood: int = 3) -> dict[str, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): a sample is inside the other set's manifold when
    it lies within some member's distance to its k-th nearest neighbour (k = 3, as torch-fidelity)."""
    f = torch.as_tensor(np.asarray(fake, np.float32))
    r = torch.as_tensor(np.asarray(real, np.float32))
    if min(len(f), len(r)) <= neighborhood:
        raise ValueError(f"precision/recall need more than {neighborhood} samples per set, got {len(f)}, {len(r)}")
    radius_f = _kth_neighbour_distance(f, neighborhood)  # [Nf]
    radius_r = _kth_neighbour_distance(r, neighborhood)  # [Nr]
    precision = _inside_fraction(f, r, radius_r)
    recall = _inside_fraction(r, f, radius_f)
    return {"precision": precision, "recall": recall}


def _kth_neighbour_distance(x: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    # k + 1: the nearest neighbour of a point in its own set is itself
    return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(block)])


def _inside_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int = 4096) -> float:
    inside = [(torch.cdist(b, centres) <= radii).any(dim=1) for b in points.split(block)]
    return torch.cat(inside).float().mean().item()


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> dict[str, float]:
    """exp(E KL(p(y|x) || p(y))) per split of shuffled samples (torch-fidelity's logits_unbiased, 10 splits)."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if len(x) < splits:
        raise ValueError(f"Inception Score needs at least {splits} samples, got {len(x)}")
    x = x[np.random.RandomState(seed).permutation(len(x))]
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * len(x) // splits, (i + 1) * len(x) // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)
        scores.append((p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1).mean().exp().item())
    return {"is_mean": float(np.mean(scores)), "is_std": float(np.std(scores))}


# --------------------------------------------------------------------------------------------- references
@dataclass
class Reference:
    """Reference statistics of real images. `extractor`/`preprocessing` are None for ADM reference batches."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    n: int | None
    extractor: str | None
    preprocessing: str | None
    source: str
    features: np.ndarray | None = None  # [n, D] float32, needed for KID / precision-recall
    _frechet: FrechetReference | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_stats(
        cls,
        stats: FeatureStats,
        extractor: str,
        preprocessing: str,
        source: str,
        features: np.ndarray | None = None,
    ) -> Reference:
        return cls(stats.mu, stats.sigma, stats.n, extractor, preprocessing, source, features)

    def frechet(self) -> FrechetReference:
        """FID against this reference (S^1/2 cached; the features, when present, give the fast low-rank route)."""
        if self._frechet is None:
            self._frechet = FrechetReference(self.mu, self.sigma, low_rank_factor(self.features))
        return self._frechet

    def check_extractor(self, extractor: str) -> None:
        """A clear error when these statistics came from a different network; ADM files carry no identity."""
        if self.extractor is not None and self.extractor != extractor:
            raise ValueError(
                f"reference statistics {self.source} were computed with extractor '{self.extractor}', but the "
                f"samples use '{extractor}': FID between different feature spaces is meaningless; recompute the "
                "reference with the same Inception weights"
            )

    def need_features(self, metric: str) -> np.ndarray:
        if self.features is None:
            raise ValueError(
                f"{metric} needs the reference's feature vectors, and {self.source} holds only mu/sigma; "
                "save a reference that keeps its features (the FID job's statistics with KID or precision/recall "
                "on) or give the real images"
            )
        return self.features


def save_reference(path: str | Path, ref: Reference) -> str | Path:
    """Write `ref` as a statistics .npz to a local path or an fsspec URL (written whole, then renamed);
    returns `path`."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"statistics files end in .npz, got {path}")
    arrays = {
        "format": np.array(STATS_FORMAT),
        "mu": ref.mu,
        "sigma": ref.sigma,
        "n": np.array(-1 if ref.n is None else ref.n),
        "extractor": np.array(ref.extractor or ""),
        "preprocessing": np.array(ref.preprocessing or ""),
    }
    if ref.features is not None:
        arrays["features"] = np.asarray(ref.features, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fs, target = fsspec.core.url_to_fs(str(path))
    fs.makedirs(posixpath.dirname(target) or ".", exist_ok=True)
    tmp = target.removesuffix(".npz") + ".tmp.npz"
    fs.pipe_file(tmp, buf.getvalue())
    fs.mv(tmp, target)
    return path


def load_reference(path: str | Path) -> Reference:
    """Our statistics .npz, or an ADM reference batch (keys `mu`, `sigma`; other arrays are not read), from a
    local path or an fsspec URL (only the arrays read are fetched)."""
    path = str(path)
    fs, target = fsspec.core.url_to_fs(path)
    if not fs.isfile(target):
        raise FileNotFoundError(f"reference statistics {path}: no such file")
    with fs.open(target, "rb") as f:
        return _read_reference(f, path)


def _read_reference(f, path: str) -> Reference:
    try:
        data = np.load(f, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from e
    with data:
        keys = set(data.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"{path}: a statistics .npz needs arrays 'mu' and 'sigma', found {sorted(keys)}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not fit together")
        if "format" not in keys:  # ADM reference batch
            return Reference(mu, sigma, None, None, None, str(path))
        if str(data["format"]) != STATS_FORMAT:
            raise ValueError(f"{path}: unknown statistics format '{data['format']}' (expected {STATS_FORMAT})")
        n = int(data["n"])
        features = data["features"] if "features" in keys else None
        return Reference(
            mu,
            sigma,
            None if n < 0 else n,
            str(data["extractor"]) or None,
            str(data["preprocessing"]) or None,
            str(path),
            features,
        )
