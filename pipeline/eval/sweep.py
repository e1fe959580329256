"""Token-count sweeps: reconstructions (rFID per k) and, with pipeline.eval.generate, AR samples (gFID per k).

The reconstruction plan, top to bottom (pipeline.eval.sweep_run.run_sweep runs it; this module holds the stages):

    rows = image_dataset(inputs, R).limit(N)        # or center_views(read_corpus(path)): tokens, not images
    rows = rows.map_batches(ReconstructStage)       # actors: encode each image once, decode every k in
                                                    #   batches that mix k's; originals become rows with k = 0
    rows = with_inception_features(rows)            # actors: Inception on every reconstruction (+ originals)
    Collector(partial).consume(rows)                # driver (pipeline.eval.sweep_results): rows -> chunk files
    g = gather(partial)                             # per k: merged statistics, a bounded feature subset
    results = summarize(g, ks, reference)           # pipeline.eval.report: FID, P/R, KID, IS, PSNR/SSIM/MSE

Every image gets one output row per k plus one row with k = 0 (REAL) that carries its work counters
(and the original's features when the reference is computed in the same pass). The decoder's initial noise
for an image comes from a generator seeded by sha256(seed, key), the same for every k, so numbers do not depend
on batching, actors or resumption, and an image's k's form one table an adaptive search can be replayed on
(pipeline.eval.sweep_adaptive). The driver writes complete images to `partial/chunk-NNNNNN.npz` (features and pixel
metrics per k) where the output goes; a rerun with the same settings skips the images already there.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..devices import stage_device
from ..image_metrics import pixel_metrics
from ..inception import model_output_to_uint8
from .features import is_error

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


def parse_ks(value: str | int | list) -> list[int]:
    """Token counts from "1,2,4" (a command line), a YAML list [1, 2, 4] or a single number; else a ValueError."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else value
    items = items if isinstance(items, list | tuple) else [items]
    ks = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int | str) or not str(x).lstrip("-").isdigit():
            raise ValueError(f"token counts are integers like 1,2,4 or [1, 2, 4], got {value!r}")
        ks.append(int(x))
    return ks


def check_ks(ks: list[int], num_registers: int) -> tuple[int, ...]:
    """Sorted, unique token counts, each in 1..num_registers; else a ValueError that says which."""
    if not ks:
        raise ValueError("no token counts given (e.g. 1,2,4)")
    bad = sorted({k for k in ks if not 1 <= k <= num_registers})
    if bad:
        raise ValueError(
            f"k={bad} outside 1..{num_registers}: this model has {num_registers} registers (tokens per image)"
        )
    return tuple(sorted(set(ks)))


# augment modes in which every image has its un-augmented view (aug 0); "random-flip" keeps aug 0 for only
# about half the images, "tencrop" for none (pipeline.data.preprocess)
SWEEPABLE_AUGMENT = ("none", "flip")


def check_sweepable(augment: str) -> None:
    """A ValueError unless every image of a corpus written with this augment mode has its aug 0 view."""
    if augment not in SWEEPABLE_AUGMENT:
        raise ValueError(
            f"the corpus was written with augment '{augment}', so not every image has its un-augmented view "
            f"(aug 0) to score against a center-crop reference; sweep a corpus made with augment "
            f"{' or '.join(repr(a) for a in SWEEPABLE_AUGMENT)}"
        )


def center_views(ds, augment: str):
    """A token corpus's rows for a sweep: only each image's un-augmented view (aug 0), the one the center-crop
    reference and the originals' pixel metrics describe (other views would repeat keys)."""
    check_sweepable(augment)
    return ds if augment == "none" else ds.filter(lambda row: row["aug"] == 0)


# --------------------------------------------------------------------------------------------- decoding
def noise_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "little") >> 1


def initial_noise(model, seed: int, jobs: list[tuple[str, int]]) -> torch.Tensor:
    """One noise draw per (key, k) job from a CPU generator seeded by (seed, key): [J, C, h, w]. Every k of an
    image starts from the same noise, so its reconstructions differ only by the tokens (a grid row shows one
    image gaining detail, not a new sample per k)."""
    C, h = model.cfg.vae.latent_channels, model.cfg.latent_size
    draws = [
        torch.randn((1, C, h, h), generator=torch.Generator().manual_seed(noise_seed(seed, key))) for key, _ in jobs
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
ROW_COLUMNS = ("key", "label", "k", "want", "png", "mse", "psnr", "ssim", "encode_calls", "decode_calls", "error")
ROW_DTYPES = {"key": object, "label": np.int64, "k": np.int16, "want": bool, "png": object, "mse": np.float64}
ROW_DTYPES |= {"psnr": np.float64, "ssim": np.float64, "encode_calls": np.int32, "decode_calls": np.int32}
ROW_DTYPES |= {"error": object}


class RowBuilder:
    """Output rows of a stage, column by column (numpy batch format)."""

    def __init__(self, resolution: int):
        self.R = resolution
        self.cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
        self.images: list[np.ndarray] = []

    def add(
        self, key, label, k, image=None, want=False, png=b"", metrics=(np.nan,) * 3, encode_calls=0, decoded=0, error=""
    ):
        values = (key, label, k, want, png, *metrics, encode_calls, decoded, error)
        for name, value in zip(ROW_COLUMNS, values, strict=True):
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
        from ..data.preprocess import to_model_input

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
            out.add(key, label, k, recon[m], True, png_bytes(recon[m]) if in_grid else b"", row_metrics, decoded=1)
