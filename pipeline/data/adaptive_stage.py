"""The Ray Data stage of `pretokenize --adaptive`: image rows -> each image's own shortest good prefix.

    ds.map_batches(AdaptiveTokenizeActor, fn_constructor_kwargs={..., "adaptive": AdaptiveSettings(...).to_dict()},
                   compute=ray.data.ActorPoolStrategy(size=n), batch_format="pyarrow")

Like pipeline.data.pretokenize.TokenizeActor, but every image's token list is its own length (pipeline.data.adaptive's
search), and two more columns travel to the driver for the manifest: `adaptive_missed` (bool) and
`adaptive_decodes` (decoder calls spent). The decoder noise of an image comes from a seed fixed by its (key, aug),
so a rerun picks the same k's.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .adaptive import Criterion, Decoding, make_scorer, search_lengths
from .pretokenize import TOKENS_SCHEMA, TokenizeActor

ADAPTIVE_COLUMNS = [("adaptive_missed", pa.bool_()), ("adaptive_decodes", pa.int16())]
ADAPTIVE_TOKENS_SCHEMA = pa.schema(list(TOKENS_SCHEMA) + [pa.field(n, t) for n, t in ADAPTIVE_COLUMNS])


@dataclass(frozen=True)
class AdaptiveSettings:
    criterion: str  # psnr | inception
    target: float
    ladder: tuple[int, ...]
    timesteps: int = 25
    guidance_scale: float = 1.0
    inception_weights: str | None = None  # None: the project's converted weights (pipeline.inception)

    def to_dict(self) -> dict:
        return {**asdict(self), "ladder": list(self.ladder)}

    def decoding_text(self) -> str:
        return f"timesteps={self.timesteps},guidance_scale={self.guidance_scale:g}"


def image_seed(key: str, aug: int) -> int:
    """A stable 31-bit seed per (key, aug): the image's decoder noise at every k."""
    return zlib.crc32(f"{key}/{aug}".encode()) & 0x7FFFFFFF


class AdaptiveTokenizeActor(TokenizeActor):
    """Ray Data actor: image rows -> variable-length token rows + adaptive_missed / adaptive_decodes."""

    def __init__(self, adaptive: dict, **kwargs):
        super().__init__(**kwargs)
        settings = AdaptiveSettings(**{**adaptive, "ladder": tuple(adaptive["ladder"])})
        self.criterion = Criterion(settings.criterion, settings.target)
        self.ladder = list(settings.ladder)
        self.decoding = Decoding(timesteps=settings.timesteps, guidance_scale=settings.guidance_scale)
        self.scorer = make_scorer(self.criterion, settings.inception_weights, device=self.model.device)

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
            tokens, result = search_lengths(
                self.model, photos, self.criterion, self.ladder, self.scorer, seeds, self.decoding
            )
            tokens = tokens.cpu().numpy().astype(np.uint16)  # [M, n_registers]
            rows = [tokens[i, :k] for i, k in enumerate(result.k)]
            lengths[mask], missed[mask], decodes[mask] = result.k, result.missed, result.decodes
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = pa.array(np.concatenate(rows) if rows else np.zeros(0, np.uint16))
        column = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~mask))
        out = batch.drop_columns(["image"])
        out = out.append_column(TOKENS_SCHEMA.field("tokens"), column)
        out = out.append_column("adaptive_missed", pa.array(missed, mask=~mask))
        out = out.append_column("adaptive_decodes", pa.array(decodes, mask=~mask))
        return out.cast(ADAPTIVE_TOKENS_SCHEMA)
