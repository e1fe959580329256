"""A sweep's partial results: written by the driver chunk by chunk, read back into per-k summaries of bounded size.

    partial = PartialResults(url + "/partial", fingerprint, groups)   # any fsspec URL; settings.json must match
    Collector(partial, groups, chunk_images).consume(rows)            # rows -> complete images -> chunk files
    g = gather(partial, subset_size=10_000)                           # one chunk in memory at a time

`gather` keeps per k (and per adaptive target, pipeline.eval.sweep_adaptive: one more group each): merged
float64 statistics (all images: FID), a bounded, seeded subset of the feature vectors and logits
(precision/recall, KID, IS), and sums of the pixel metrics. The subset holds the `subset_size` images with the
smallest sha256(seed|key), in input order: it does not depend on chunking, arrival order or resumption, the
same images are kept for every k, and with at most `subset_size` images it holds them all. So the driver's
memory does not grow with the number of images N (only the set of finished keys does, about 100 bytes per
image, for resumption and deduplication).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..data.corpus import join, output_fs
from ..inception import FEATURE_DIM
from .fid import FeatureStats
from .sweep import ERROR, REAL
from .sweep_adaptive import AdaptivePlan, Tally, choose, chosen_rows, score_table

PIXEL_METRICS = ("mse", "psnr", "ssim")
CHUNK_FORMAT = 2  # part of every fingerprint: chunks of another layout are not resumed


@dataclass
class ImageResult:
    """Everything the sweep keeps about one image (or generated sample), gathered from its rows."""

    key: str
    label: int
    rows: dict[int, dict] = field(default_factory=dict)  # k -> {features, logits, mse, psnr, ssim, png}
    encode_calls: int = 0
    decode_calls: int = 0
    real_feature_pass: int = 0
    error: str | None = None


class ResumeMismatchError(ValueError):
    pass


class PartialResults:
    """`<url>/`: `settings.json` (what must match to resume) and `chunk-NNNNNN.npz` files of complete images
    (keys, labels, counters, per k: features [n, 2048] float32, logits, mse/psnr/ssim, and the grid images as
    PNG bytes). Any fsspec URL; each file is written to a temporary name and then moved into place."""

    def __init__(self, url: str, fingerprint: dict, groups: tuple[int, ...]):
        self.url, self.fingerprint, self.groups = str(url), fingerprint, tuple(groups)
        self.fs, self.root = output_fs(self.url)

    def open(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        path = join(self.root, "settings.json")
        if self.fs.isfile(path):
            old = json.loads(self.fs.cat_file(path))
            if old != self.fingerprint:
                diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise ResumeMismatchError(
                    f"{self.url} holds partial results of a run with other settings (differs in {diff}); "
                    "write to another folder, or delete this one to start over"
                )
        else:
            self._write_atomic(path, json.dumps(self.fingerprint, indent=1, sort_keys=True).encode())

    def chunks(self) -> list[str]:
        return sorted(self.fs.glob(join(self.root, "chunk-*.npz")))

    def read(self, path: str) -> dict[str, np.ndarray]:
        """One chunk's arrays (the whole file: a chunk is the unit of memory)."""
        with np.load(io.BytesIO(self.fs.cat_file(path)), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}

    def done_keys(self) -> set[str]:
        done: set[str] = set()
        for path in self.chunks():
            with np.load(io.BytesIO(self.fs.cat_file(path)), allow_pickle=False) as z:
                done.update(str(k) for k in z["keys"])
        return done

    def write(self, images: list[ImageResult], has_logits: bool) -> str:
        index = len(self.chunks())
        arrays: dict[str, np.ndarray] = {
            "keys": np.array([r.key for r in images], dtype=str),
            "labels": np.array([r.label for r in images], np.int64),
            "encode_calls": np.array([r.encode_calls for r in images], np.int64),
            "decode_calls": np.array([r.decode_calls for r in images], np.int64),
            "real_feature_pass": np.array([r.real_feature_pass for r in images], np.int64),
            "errors": np.array([r.error or "" for r in images], dtype=str),
            "good": np.array([r.error is None for r in images], bool),
        }
        good = [r for r in images if r.error is None]
        for k in self.groups:
            rows = [r.rows[k] for r in good]
            features = [x["features"] for x in rows] or [np.zeros((0, FEATURE_DIM))]
            arrays[f"features_{k}"] = np.vstack(features).astype(np.float32)  # [n, D]
            if has_logits and rows:
                arrays[f"logits_{k}"] = np.stack([x["logits"] for x in rows]).astype(np.float32)
            for m in PIXEL_METRICS:
                arrays[f"{m}_{k}"] = np.array([x[m] for x in rows], np.float64)
            for j, x in enumerate(rows):
                if x["png"]:
                    arrays[f"png_{j}_{k}"] = np.frombuffer(x["png"], np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = join(self.root, f"chunk-{index:06d}.npz")
        self._write_atomic(path, buf.getvalue())
        return path

    def _write_atomic(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path + ".tmp", data)
        self.fs.mv(path + ".tmp", path)


class Collector:
    """Driver side: rows (images in order, each image's rows together) -> complete ImageResults -> chunks.
    `expected` are the k's every good image must have rows for. Rows of images an earlier run finished are
    skipped (a resumed generation regenerates whole groups); a key that comes back after its image was
    completed in this run is an error (duplicate keys in the input, or several views of one image)."""

    def __init__(
        self,
        partial: PartialResults,
        expected: tuple[int, ...],
        chunk_images: int,
        on_chunk: Callable[[str], None] | None = None,
    ):
        self.partial, self.expected, self.chunk_images, self.on_chunk = partial, set(expected), chunk_images, on_chunk
        self.pending: dict[str, ImageResult] = {}
        self.complete: list[ImageResult] = []
        self.done = partial.done_keys()  # images finished by earlier runs
        self.finished: set[str] = set()  # images finished by this run
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
        if key in self.finished:
            raise ValueError(
                f"key {key!r} appears again after its image was complete: the input holds duplicate keys "
                "(or several views of one image)"
            )
        r = self.pending.setdefault(key, ImageResult(key, int(batch["label"][i])))
        if k == ERROR:
            r.error = str(batch["error"][i])
        else:
            if k == REAL:
                r.encode_calls += int(batch["encode_calls"][i])
                r.real_feature_pass += int(batch["feature_pass"][i])
            r.decode_calls += int(batch["decode_calls"][i])
            r.rows[k] = {
                "features": batch["features"][i],
                "logits": batch["logits"][i] if "logits" in batch else None,
                "png": batch["png"][i] if isinstance(batch["png"][i], bytes) else b"",
                **{m: float(batch[m][i]) for m in PIXEL_METRICS},
            }
        if r.error is not None or self.expected <= set(r.rows):
            self.complete.append(self.pending.pop(key))
            self.finished.add(key)
            self.images_this_run += 1
            if len(self.complete) >= self.chunk_images:
                self.flush()

    def flush(self) -> None:
        if self.complete:
            path = self.partial.write(self.complete, self.has_logits)
            self.complete = []
            if self.on_chunk is not None:
                self.on_chunk(path)


# --------------------------------------------------------------------------------------------- read back
def key_priority(seed: int, keys: list[str]) -> np.ndarray:
    """uint64 [n]: the subset keeps the smallest; a fixed function of (seed, key)."""
    digests = (hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8] for key in keys)
    return np.array([int.from_bytes(d, "little") for d in digests], np.uint64)


@dataclass
class Subset:
    """A bounded, seeded sample of one k's feature vectors (and logits): the `size` rows of smallest priority,
    in input order. Holds at most size + size // 4 rows (`capacity`) between compactions: at ADM's 10k and 10
    groups of 2048 float32 features that is 1.0 GB at most, where twice the size would be 1.6 GB."""

    size: int
    dim: int = FEATURE_DIM
    seen: int = 0
    logits: np.ndarray | None = None  # [m, L]
    _cutoff: int | None = None  # a row with priority above this can no longer be kept

    def __post_init__(self):
        self.priority = np.zeros(0, np.uint64)  # [m]
        self.features = np.zeros((0, self.dim), np.float32)  # [m, D]

    def add(self, priority: np.ndarray, features: np.ndarray, logits: np.ndarray | None = None) -> None:
        self.seen += len(priority)
        if self._cutoff is not None:
            keep = priority <= self._cutoff
            priority, features = priority[keep], features[keep]
            logits = logits[keep] if logits is not None else None
        self.priority = np.concatenate([self.priority, priority])
        self.features = np.concatenate([self.features, features.astype(np.float32, copy=False)])
        if logits is not None:
            self.logits = logits if self.logits is None else np.concatenate([self.logits, logits])
        if len(self.priority) > self.capacity:
            self.compact()

    @property
    def capacity(self) -> int:
        """The most rows held between compactions."""
        return self.size + max(1, self.size // 4)

    def compact(self) -> None:
        """Down to the `size` rows of smallest priority, input order kept."""
        if len(self.priority) <= self.size:
            return
        keep = np.sort(np.argpartition(self.priority, self.size - 1)[: self.size])
        self.priority, self.features = self.priority[keep], self.features[keep]
        self.logits = self.logits[keep] if self.logits is not None else None
        self._cutoff = int(self.priority.max())

    @property
    def complete(self) -> bool:
        """True when the subset holds every row it was given."""
        return len(self.priority) == self.seen

    @property
    def nbytes(self) -> int:
        return self.priority.nbytes + self.features.nbytes + (self.logits.nbytes if self.logits is not None else 0)


@dataclass
class PerK:
    """One k's running summary."""

    stats: FeatureStats
    subset: Subset
    pixel_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PIXEL_METRICS, 0.0))
    pixel_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PIXEL_METRICS, 0))

    def add(self, priority: np.ndarray, features: np.ndarray, logits: np.ndarray | None, pixels: dict) -> None:
        if len(features):
            self.stats.add(features)
            self.subset.add(priority, features, logits)
        for m, values in pixels.items():
            finite = values[~np.isnan(values)]
            self.pixel_sums[m] += float(finite.sum())
            self.pixel_counts[m] += len(finite)

    def pixel_mean(self, m: str) -> float | None:
        return self.pixel_sums[m] / self.pixel_counts[m] if self.pixel_counts[m] else None


@dataclass
class Gathered:
    """Every chunk read back, summarised: counters, per-k summaries, the grid images."""

    images: int
    keys_sha256: str  # of the evaluated keys, one per line, in input order
    label_counts: Counter
    errors: list[dict]
    encode_calls: int
    decode_calls: int
    real_feature_passes: int
    per_k: dict[int, PerK]
    grid: dict[str, dict[int, bytes]]  # key -> k (or adaptive group) -> PNG bytes
    subset_size: int
    has_logits: bool
    adaptive: dict[int, Tally] = field(default_factory=dict)  # adaptive group -> its counts
    chosen: dict[str, dict[int, tuple[int, bool]]] = field(default_factory=dict)  # grid key -> group -> (k, missed)


def gather(
    partial: PartialResults, subset_size: int = 10_000, seed: int = 0, adaptive: AdaptivePlan | None = None
) -> Gathered:
    """Read the chunks one at a time and fold them into per-k summaries (memory bounded by subset_size); with
    `adaptive`, each target's chosen reconstructions into one more group."""
    if subset_size < 1:
        raise ValueError(f"the feature subset needs at least 1 image, got {subset_size}")
    keys_hash, labels, errors = hashlib.sha256(), Counter(), []
    images = enc = dec = real = 0
    has_logits = False
    groups = list(partial.groups) + ([g for g, _ in adaptive.groups] if adaptive else [])
    per_k = {k: PerK(FeatureStats.empty(FEATURE_DIM), Subset(subset_size)) for k in groups}
    tallies = {g: Tally(c) for g, c in adaptive.groups} if adaptive else {}
    grid: dict[str, dict[int, bytes]] = {}
    chosen: dict[str, dict[int, tuple[int, bool]]] = {}
    for path in partial.chunks():
        z = partial.read(path)
        good = z["good"]
        keys = [str(x) for x in z["keys"]]
        good_keys = [key for key, g in zip(keys, good, strict=True) if g]
        images += len(good_keys)
        keys_hash.update("".join(f"{key}\n" for key in good_keys).encode())
        labels.update(int(x) for x in z["labels"][good])
        errors += [{"key": key, "error": str(e)} for key, e, g in zip(keys, z["errors"], good, strict=True) if not g]
        enc += int(z["encode_calls"].sum())
        dec += int(z["decode_calls"].sum())
        real += int(z["real_feature_pass"].sum())
        priority = key_priority(seed, good_keys)
        for k in partial.groups:
            logits = z.get(f"logits_{k}")
            has_logits = has_logits or logits is not None
            per_k[k].add(priority, z[f"features_{k}"], logits, {m: z[f"{m}_{k}"] for m in PIXEL_METRICS})
            for j, key in enumerate(good_keys):
                if f"png_{j}_{k}" in z:
                    grid.setdefault(key, {})[k] = z[f"png_{j}_{k}"].tobytes()
        for g, criterion in adaptive.groups if adaptive is not None and good_keys else []:
            r = choose(score_table(z, adaptive.ladder, criterion), adaptive.ladder, criterion)
            tallies[g].add(r)
            pixels = {m: chosen_rows(z, m, r.k) for m in PIXEL_METRICS}
            per_k[g].add(priority, chosen_rows(z, "features", r.k), chosen_rows(z, "logits", r.k), pixels)
            for key, k, missed in zip(good_keys, r.k, r.missed, strict=True):
                if key in grid and int(k) in grid[key]:
                    grid[key][g] = grid[key][int(k)]
                    chosen.setdefault(key, {})[g] = (int(k), bool(missed))
    for s in per_k.values():
        s.subset.compact()
    return Gathered(
        images,
        keys_hash.hexdigest(),
        labels,
        errors,
        enc,
        dec,
        real,
        per_k,
        grid,
        subset_size,
        has_logits,
        tallies,
        chosen,
    )
