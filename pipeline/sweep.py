"""Token-count sweeps: reconstructions (rFID per k) and, with pipeline.generate, AR samples (gFID per k).

The reconstruction plan, top to bottom:

    rows = image_dataset(inputs, R).limit(N)        # or read_corpus(path): tokens instead of images
    rows = rows.map_batches(ReconstructStage)       # actors: encode each image once, decode every k in
                                                    #   batches that mix k's; originals become rows with k = 0
    rows = with_inception_features(rows)            # actors: Inception on every reconstruction (+ originals)
    Collector(partial).consume(rows)                # driver: rows -> complete images -> chunk files on disk
    summary = summarize(partial, ks, reference)     # merged statistics per k -> FID, P/R, IS, PSNR/SSIM/MSE

Every image gets one output row per k plus one row with k = 0 (REAL) that carries its work counters
(and the original's features when the reference is computed in the same pass). The decoder's initial noise
for (image, k) comes from a generator seeded by sha256(seed, key, k), so numbers do not depend on batching,
actors or resumption. The driver writes complete images to `partial/chunk-NNNNNN.npz` (features and pixel
metrics per k); a rerun with the same settings skips the images already there and merges the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .devices import stage_device
from .features import FEATURE_DIM, is_error
from .fid import FeatureStats, Reference, inception_score, kernel_inception_distance, low_rank_factor, merge_all
from .fid import precision_recall as prc
from .image_metrics import pixel_metrics
from .inception import NO_CLASSIFIER, model_output_to_uint8

IS_SPLITS = 10  # torch-fidelity's default
REAL = 0  # the k of an original image's row
ERROR = -1  # the k of a bad input's row


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DecodeSettings:
    """How token prefixes become images; all of it decides the numbers."""

    timesteps: int = 25
    guidance_scale: float = 1.0
    apg: bool = False
    seed: int = 0
    decode_batch: int = 16  # decoder calls take this many (image, k) jobs, k's mixed


def check_ks(ks: list[int], num_registers: int) -> tuple[int, ...]:
    """Sorted, unique token counts, each in 1..num_registers; else a ValueError that says which."""
    if not ks:
        raise ValueError("no token counts given (--ks 1,2,4,...)")
    bad = sorted({k for k in ks if not 1 <= k <= num_registers})
    if bad:
        raise ValueError(
            f"k={bad} outside 1..{num_registers}: this model has {num_registers} registers (tokens per image)"
        )
    return tuple(sorted(set(ks)))


def parse_ks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {text!r}") from None


# --------------------------------------------------------------------------------------------- decoding
def noise_seed(seed: int, key: str, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}|{k}".encode()).digest()[:8], "little") >> 1


def initial_noise(model, seed: int, jobs: list[tuple[str, int]]) -> torch.Tensor:
    """One noise draw per (key, k) job, each from its own CPU generator: [J, C, h, w]."""
    C, h = model.cfg.vae.latent_channels, model.cfg.latent_size
    draws = [
        torch.randn((1, C, h, h), generator=torch.Generator().manual_seed(noise_seed(seed, key, k))) for key, k in jobs
    ]
    return torch.cat(draws).to(model.device)


def decode_prefixes(model, prefixes: list[torch.Tensor], jobs: list[tuple[str, int]], s: DecodeSettings) -> np.ndarray:
    """Token prefixes (1D, any lengths) -> uint8 [J, R, R, 3], decoded `decode_batch` at a time."""
    out = []
    for i in range(0, len(prefixes), s.decode_batch):
        part = slice(i, i + s.decode_batch)
        noise = initial_noise(model, s.seed, jobs[part])
        images = model.detokenize(prefixes[part], s.timesteps, s.guidance_scale, s.apg, noise=noise)
        out.append(model_output_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy())  # [b, R, R, 3]
    return np.concatenate(out)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def labels_of(batch: dict[str, np.ndarray], n: int) -> np.ndarray:
    """int64 [n]; -1 where the input has no label."""
    if "label" not in batch:
        return np.full(n, -1, np.int64)
    vals = batch["label"]
    return np.array([-1 if v is None or (isinstance(v, float) and np.isnan(v)) else int(v) for v in vals], np.int64)


def error_of(batch: dict[str, np.ndarray], n: int) -> list[str | None]:
    """The error message of each input row (class: message), None for good rows."""
    if "error" not in batch:
        return [None] * n
    classes = batch["error_class"] if "error_class" in batch else [None] * n
    return [
        (f"{c}: {e}" if is_error(c) else str(e)) if is_error(e) else None
        for e, c in zip(batch["error"], classes, strict=True)
    ]


# the rows the model stages emit (then InceptionStage adds features and drops image)
ROW_COLUMNS = ("key", "label", "k", "want", "png", "mse", "psnr", "ssim", "encode_calls", "error")
ROW_DTYPES = {"key": object, "label": np.int64, "k": np.int16, "want": bool, "png": object, "mse": np.float64}
ROW_DTYPES |= {"psnr": np.float64, "ssim": np.float64, "encode_calls": np.int32, "error": object}


class RowBuilder:
    """Output rows of a stage, column by column (numpy batch format)."""

    def __init__(self, resolution: int):
        self.R = resolution
        self.cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
        self.images: list[np.ndarray] = []

    def add(self, key, label, k, image=None, want=False, png=b"", metrics=(np.nan,) * 3, encode_calls=0, error=""):
        for name, value in zip(ROW_COLUMNS, (key, label, k, want, png, *metrics, encode_calls, error), strict=True):
            self.cols[name].append(value)
        self.images.append(image if image is not None else np.zeros((self.R, self.R, 3), np.uint8))

    def batch(self) -> dict[str, np.ndarray]:
        out = {c: np.array(v, dtype=ROW_DTYPES[c]) for c, v in self.cols.items()}
        out["image"] = np.stack(self.images)  # [M, R, R, 3] uint8
        return out


class ReconstructStage:
    """Ray Data actor UDF. In: images (key, label, image uint8 [R, R, 3], error...) or corpus rows (key, label,
    tokens). Out: per good image one REAL row and one row per k (reconstruction, MSE/PSNR/SSIM against the
    original), image-major; per bad input one ERROR row. `png` holds images of `grid_keys` for the figure."""

    def __init__(
        self,
        model: str,
        ks: tuple[int, ...],
        settings: dict,
        grid_keys: list[str],
        real_features: bool,
        device: str = "cpu",
        threads: int | None = None,
    ):
        from flextok import FlexTok

        if threads:
            torch.set_num_threads(threads)
        device = stage_device("the sweep's decoder actor", device == "cuda")
        self.model = FlexTok.from_pretrained(model, map_location=device).eval()
        self.ks, self.s = ks, DecodeSettings(**settings)
        self.grid, self.real_features = set(grid_keys), real_features

    @torch.no_grad()  # not a global switch: stages also run in-process (tests, local mode)
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        labels, errors = labels_of(batch, len(keys)), error_of(batch, len(keys))
        good = [i for i, e in enumerate(errors) if e is None]
        tokens = self.tokens(batch, good)  # row -> LongTensor [n]
        jobs = [(keys[i], k) for i in good for k in self.ks]  # image-major: each decoder batch mixes k's
        prefixes = [tokens[i][:k] for i in good for k in self.ks]
        recon = decode_prefixes(self.model, prefixes, jobs, self.s) if jobs else None  # [J, R, R, 3]

        out = RowBuilder(self.model.cfg.image_size)
        for i, key in enumerate(keys):
            if errors[i] is not None:
                out.add(key, labels[i], ERROR, error=errors[i])
                continue
            j = good.index(i) * len(self.ks)
            self.add_image_rows(
                out, key, labels[i], batch["image"][i] if "image" in batch else None, recon[j : j + len(self.ks)]
            )
        return out.batch()

    def tokens(self, batch: dict[str, np.ndarray], good: list[int]) -> dict[int, torch.Tensor]:
        """Images: one encoder pass over the good rows; a corpus: its stored tokens."""
        from .preprocess import to_model_input

        if not good:
            return {}
        if "image" not in batch:
            return {i: torch.as_tensor(np.asarray(batch["tokens"][i], np.int64)) for i in good}
        originals = np.ascontiguousarray(batch["image"][good])  # [G, R, R, 3]
        ids = self.model.tokenize(to_model_input(originals).to(self.model.device)).cpu()  # [G, n]
        return dict(zip(good, ids, strict=True))

    def add_image_rows(self, out: RowBuilder, key: str, label: int, original: np.ndarray | None, recon: np.ndarray):
        """The REAL row (original, counters) then one row per k (reconstruction, pixel metrics)."""
        in_grid = key in self.grid
        has_image = original is not None
        png = png_bytes(original) if in_grid and has_image else b""
        out.add(key, label, REAL, original, self.real_features and has_image, png, encode_calls=int(has_image))
        metrics = pixel_metrics(np.repeat(original[None], len(self.ks), 0), recon) if has_image else None
        for m, k in enumerate(self.ks):
            row_metrics = tuple(float(x[m]) for x in metrics) if metrics is not None else (np.nan,) * 3
            out.add(key, label, k, recon[m], True, png_bytes(recon[m]) if in_grid else b"", row_metrics)


# --------------------------------------------------------------------------------------------- partial results
@dataclass
class ImageResult:
    """Everything the sweep keeps about one image (or generated sample), gathered from its rows."""

    key: str
    label: int
    rows: dict[int, dict] = field(default_factory=dict)  # k -> {features, logits, mse, psnr, ssim, png}
    encode_calls: int = 0
    real_feature_pass: int = 0
    error: str | None = None


class ResumeMismatchError(ValueError):
    pass


class PartialResults:
    """`<output>/partial/`: `settings.json` (what must match to resume) and `chunk-NNNNNN.npz` files of
    complete images (keys, labels, counters, per k: features [n, 2048] float32, logits, mse/psnr/ssim, and
    the grid images as PNG bytes). Each file is written to a temporary name and renamed."""

    def __init__(self, folder: Path, fingerprint: dict, groups: tuple[int, ...]):
        self.folder, self.fingerprint, self.groups = Path(folder), fingerprint, groups

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "settings.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != self.fingerprint:
                diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise ResumeMismatchError(
                    f"{self.folder} holds partial results of a run with other settings (differs in {diff}); "
                    "use another --output, or delete that folder to start over"
                )
        else:
            _write_atomic(path, json.dumps(self.fingerprint, indent=1, sort_keys=True).encode())

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz"))

    def done_keys(self) -> set[str]:
        done: set[str] = set()
        for path in self.chunks():
            with np.load(path, allow_pickle=False) as z:
                done.update(str(k) for k in z["keys"])
        return done

    def write(self, images: list[ImageResult], has_logits: bool) -> Path:
        index = len(self.chunks())
        arrays: dict[str, np.ndarray] = {
            "keys": np.array([r.key for r in images], dtype=str),
            "labels": np.array([r.label for r in images], np.int64),
            "encode_calls": np.array([r.encode_calls for r in images], np.int64),
            "real_feature_pass": np.array([r.real_feature_pass for r in images], np.int64),
            "errors": np.array([r.error or "" for r in images], dtype=str),
        }
        good = [r for r in images if r.error is None]
        arrays["good"] = np.array([r.error is None for r in images], bool)
        for k in self.groups:
            rows = [r.rows[k] for r in good]
            arrays[f"features_{k}"] = (
                np.stack([x["features"] for x in rows]).astype(np.float32)
                if rows
                else np.zeros((0, FEATURE_DIM), np.float32)
            )
            if has_logits and rows:
                arrays[f"logits_{k}"] = np.stack([x["logits"] for x in rows]).astype(np.float32)
            for m in ("mse", "psnr", "ssim"):
                arrays[f"{m}_{k}"] = np.array([x[m] for x in rows], np.float64)
            for j, x in enumerate(rows):
                if x["png"]:
                    arrays[f"png_{j}_{k}"] = np.frombuffer(x["png"], np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = self.folder / f"chunk-{index:06d}.npz"
        _write_atomic(path, buf.getvalue())
        return path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Collector:
    """Driver side: rows (images in order, each image's rows together) -> complete ImageResults -> chunks.
    `expected` are the k's every good image must have rows for; keys already done are skipped."""

    def __init__(
        self,
        partial: PartialResults,
        expected: tuple[int, ...],
        chunk_images: int,
        on_chunk: Callable[[Path], None] | None = None,
    ):
        self.partial, self.expected, self.chunk_images, self.on_chunk = partial, set(expected), chunk_images, on_chunk
        self.pending: dict[str, ImageResult] = {}
        self.complete: list[ImageResult] = []
        self.done = partial.done_keys()
        self.has_logits = False
        self.images_this_run = 0

    def consume(self, ds) -> None:
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            self.has_logits = self.has_logits or "logits" in batch
            for i in range(len(batch["key"])):
                self.add_row(batch, i)
        self.flush()
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} images ended without all their rows: {list(self.pending)[:3]}")

    def add_row(self, batch: dict[str, np.ndarray], i: int) -> None:
        key, k = str(batch["key"][i]), int(batch["k"][i])
        if key in self.done:
            return
        r = self.pending.setdefault(key, ImageResult(key, int(batch["label"][i])))
        if k == ERROR:
            r.error = str(batch["error"][i])
        else:
            if k == REAL:
                r.encode_calls += int(batch["encode_calls"][i])
                r.real_feature_pass += int(batch["feature_pass"][i])
            r.rows[k] = {
                "features": batch["features"][i],
                "logits": batch["logits"][i] if "logits" in batch else None,
                "png": batch["png"][i] if isinstance(batch["png"][i], bytes) else b"",
                **{m: float(batch[m][i]) for m in ("mse", "psnr", "ssim")},
            }
        if r.error is not None or self.expected <= set(r.rows):
            self.complete.append(self.pending.pop(key))
            self.done.add(key)
            self.images_this_run += 1
            if len(self.complete) >= self.chunk_images:
                self.flush()

    def flush(self) -> None:
        if self.complete:
            path = self.partial.write(self.complete, self.has_logits)
            self.complete = []
            if self.on_chunk is not None:
                self.on_chunk(path)


# --------------------------------------------------------------------------------------------- metrics per k
@dataclass
class Gathered:
    """All chunks read back: per k, features (in image order) and per-chunk statistics."""

    keys: list[str]
    labels: np.ndarray
    errors: list[dict]
    encode_calls: int
    real_feature_passes: int
    stats: dict[int, FeatureStats]
    features: dict[int, np.ndarray]
    logits: dict[int, np.ndarray]
    pixels: dict[int, dict[str, np.ndarray]]
    grid: dict[str, dict[int, bytes]]  # key -> k -> PNG bytes


def gather(partial: PartialResults) -> Gathered:
    keys, labels, errors, enc, real = [], [], [], 0, 0
    parts: dict[int, list[FeatureStats]] = {k: [] for k in partial.groups}
    feats: dict[int, list[np.ndarray]] = {k: [] for k in partial.groups}
    logits: dict[int, list[np.ndarray]] = {k: [] for k in partial.groups}
    pixels: dict[int, dict[str, list]] = {k: {m: [] for m in ("mse", "psnr", "ssim")} for k in partial.groups}
    grid: dict[str, dict[int, bytes]] = {}
    for path in partial.chunks():
        with np.load(path, allow_pickle=False) as z:
            good = z["good"]
            chunk_keys = [str(x) for x in z["keys"]]
            good_keys = [key for key, g in zip(chunk_keys, good, strict=True) if g]
            keys += good_keys
            labels.append(z["labels"][good])
            errors += [
                {"key": key, "error": str(e)} for key, e, g in zip(chunk_keys, z["errors"], good, strict=True) if not g
            ]
            enc += int(z["encode_calls"].sum())
            real += int(z["real_feature_pass"].sum())
            for k in partial.groups:
                f = z[f"features_{k}"]
                if len(f):
                    parts[k].append(FeatureStats.of(f))  # each chunk's block statistics; merged below
                feats[k].append(f)
                if f"logits_{k}" in z:
                    logits[k].append(z[f"logits_{k}"])
                for m in ("mse", "psnr", "ssim"):
                    pixels[k][m].append(z[f"{m}_{k}"])
                for j, key in enumerate(good_keys):
                    if f"png_{j}_{k}" in z:
                        grid.setdefault(key, {})[k] = z[f"png_{j}_{k}"].tobytes()
    return Gathered(
        keys,
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        errors,
        enc,
        real,
        {k: merge_all(v) if v else FeatureStats.empty(FEATURE_DIM) for k, v in parts.items()},
        {k: np.concatenate(v) if v else np.zeros((0, FEATURE_DIM), np.float32) for k, v in feats.items()},
        {k: np.concatenate(v) for k, v in logits.items() if v},
        {k: {m: np.concatenate(v) for m, v in d.items()} for k, d in pixels.items()},
        grid,
    )


@dataclass(frozen=True)
class MetricOptions:
    prc: bool = True
    kid: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000


def metrics_for_k(g: Gathered, k: int, ref: Reference, opts: MetricOptions) -> dict:
    """One k's row of results.json."""
    stats = g.stats[k]
    row: dict = {"k": k, "num_samples": stats.n}
    row["fid"] = ref.frechet().distance(stats.mu, stats.sigma, low_rank_factor(g.features[k])) if stats.n >= 2 else None
    features = g.features[k]
    if opts.prc:
        row.update(_with_reference_features(ref, "prc", lambda r: prc(features, r)))
    if opts.kid:
        row.update(
            _with_reference_features(
                ref, "kid", lambda r: kernel_inception_distance(features, r, opts.kid_subsets, opts.kid_subset_size)
            )
        )
    enough = k in g.logits and len(g.logits[k]) >= IS_SPLITS
    row.update(inception_score(g.logits[k], IS_SPLITS) if enough else {"is_mean": None, "is_std": None})
    for m in ("psnr", "ssim", "mse"):
        values = g.pixels[k][m]
        row[m] = float(values.mean()) if len(values) and not np.isnan(values).all() else None
    return row


def _with_reference_features(ref: Reference, name: str, fn) -> dict:
    """KID and precision/recall compare feature sets: with a mu/sigma-only reference (ADM's) say so instead."""
    if ref.features is None:
        return {f"{name}_unavailable": f"the reference {ref.source} has no feature vectors (mu/sigma only)"}
    return fn(ref.features)


def is_unavailable_reason(g: Gathered) -> str | None:
    return None if g.logits else NO_CLASSIFIER


def run_fingerprint(**settings) -> dict:
    """JSON-safe settings that must match for a rerun to resume."""
    return json.loads(json.dumps(settings, default=_json_default, sort_keys=True))


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    if isinstance(x, tuple | set):
        return list(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
