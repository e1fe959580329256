"""The Ray Data stage of `pretokenize --adaptive`: image rows -> each image's own shortest good prefix.

    ds.map_batches(AdaptiveTokenizeActor, fn_constructor_kwargs={..., "adaptive": AdaptiveSettings(...).to_dict()},
                   compute=ray.data.ActorPoolStrategy(size=n), batch_format="pyarrow")

Like pipeline.data.pretokenize.TokenizeActor, but every image's token list is its own length (pipeline.data.adaptive's
search), and two more columns travel to the driver for the manifest: `adaptive_missed` (bool) and
`adaptive_decodes` (decoder calls spent). The decoder noise of an image comes from a seed fixed by its (key, aug),
so a rerun picks the same k's.

With a length predictor (`length_predictor`: its folder, pipeline.data.length_predictor) the stage makes no decoder
call: each image's k comes from its predicted quality curve (`adaptive_decodes` = 0, `adaptive_missed` = the
prediction says no rung meets the target).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .adaptive import Criterion, Decoding, make_scorer, search_lengths
from .preprocess import to_model_input
from .pretokenize import TOKENS_SCHEMA, TokenizeActor

ADAPTIVE_COLUMNS = [("adaptive_missed", pa.bool_()), ("adaptive_decodes", pa.int16())]
ADAPTIVE_TOKENS_SCHEMA = pa.schema(list(TOKENS_SCHEMA) + [pa.field(n, t) for n, t in ADAPTIVE_COLUMNS])


@dataclass(frozen=True)
class AdaptiveSettings:
    criterion: str  # psnr | inception; with a length predictor psnr | psnr-slope
    target: float  # psnr-slope: LAMBDA, dB per token
    ladder: tuple[int, ...]
    timesteps: int = 25
    guidance_scale: float = 1.0
    inception_weights: str | None = None  # None: the project's converted weights (pipeline.inception)
    length_predictor: str | None = None  # a predictor folder: k from its predicted curve, no decoder call

    def to_dict(self) -> dict:
        return {**asdict(self), "ladder": list(self.ladder)}

    def decoding_text(self) -> str:
        return f"timesteps={self.timesteps},guidance_scale={self.guidance_scale:g}"


def image_seed(key: str, aug: int) -> int:
    """A stable 31-bit seed per (key, aug): the image's decoder noise at every k."""
    return zlib.crc32(f"{key}/{aug}".encode()) & 0x7FFFFFFF


class AdaptiveTokenizeActor(TokenizeActor):
    """Ray Data actor: image rows -> variable-length token rows + adaptive_missed / adaptive_decodes."""

    predictor = None  # a LengthPredictor when the settings name one

    def __init__(self, adaptive: dict, **kwargs):
        super().__init__(**kwargs)
        settings = AdaptiveSettings(**{**adaptive, "ladder": tuple(adaptive["ladder"])})
        self.criterion = Criterion(settings.criterion, settings.target)
        self.ladder = list(settings.ladder)
        self.decoding = Decoding(timesteps=settings.timesteps, guidance_scale=settings.guidance_scale)
        if settings.length_predictor:
            from .length_predictor import LengthPredictor, Rule

            self.predictor = LengthPredictor.load(settings.length_predictor)
            self.rule = Rule(settings.criterion, settings.target)
        else:
            self.scorer = make_scorer(self.criterion, settings.inception_weights, device=self.model.device)

    def choose(self, photos: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """uint8 photos [M, R, R, 3] -> (tokens uint16 [M, n], k [M], missed [M], decodes [M])."""
        if self.predictor is not None:
            tokens = self.model.tokenize(to_model_input(photos).to(self.model.device))  # [M, n]
            k, missed = self.predictor.choose(tokens, self.rule)
            return tokens.cpu().numpy().astype(np.uint16), k, missed, np.zeros(len(k), np.int64)
        tokens, result = search_lengths(
            self.model, photos, self.criterion, self.ladder, self.scorer, seeds, self.decoding
        )
        return tokens.cpu().numpy().astype(np.uint16), result.k, result.missed, result.decodes

    def __call__(self, batch: pa.Table) -> pa.Table:
        R, n = self.resolution, batch.num_rows
        has_image = pc.is_valid(batch.column("image"))
        mask = has_image.to_numpy(zero_copy_only=False)  # [n] bool
        lengths = np.zeros(n, np.int32)
        missed = np.zeros(n, bool)
        decodes = np.zeros(n, np.int16)
        rows: list[np.ndarray] = []
        if mask.any():
            raw = bytearray(b"".join(batch.column("image").filter(has_image).to_pylist()))
            photos = np.frombuffer(raw, np.uint8).reshape(-1, R, R, 3)
            keys = batch.column("key").filter(has_image).to_pylist()
            augs = batch.column("aug").filter(has_image).to_pylist()
            seeds = [image_seed(k, a) for k, a in zip(keys, augs, strict=True)]
            tokens, k, missed[mask], decodes[mask] = self.choose(photos, seeds)  # tokens [M, n_registers]
            rows = [tokens[i, :ki] for i, ki in enumerate(k)]
            lengths[mask] = k
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = pa.array(np.concatenate(rows) if rows else np.zeros(0, np.uint16))
        column = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~mask))
        out = batch.drop_columns(["image"])
        out = out.append_column(TOKENS_SCHEMA.field("tokens"), column)
        out = out.append_column("adaptive_missed", pa.array(missed, mask=~mask))
        out = out.append_column("adaptive_decodes", pa.array(decodes, mask=~mask))
        return out.cast(ADAPTIVE_TOKENS_SCHEMA)
