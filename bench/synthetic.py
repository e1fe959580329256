"""Synthetic webdataset input for the scale bench: `synth://bench/<shard>-<count>.tar`, made when opened.

A module of its own (not bench/scale.py's __main__) so that Ray workers import the file system by name: a class
defined in __main__ is pickled by value, and fsspec file-system classes carry a lock that cannot be pickled.
"""

from __future__ import annotations

import io
import tarfile
from functools import lru_cache
from pathlib import Path

import fsspec
import numpy as np
from fsspec.spec import AbstractFileSystem
from PIL import Image

RESOLUTION = 32  # the stand-in tokenizer's image size (the `tiny` preset's)
SHARD_RECORDS = 1000


@lru_cache(maxsize=64)
def template_jpeg(i: int) -> bytes:
    """A small JPEG of smooth random colour (64 templates; records cycle through them)."""
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((RESOLUTION + 8, RESOLUTION + 8), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synthetic_tar(shard: int, count: int) -> bytes:
    """A webdataset tar of `count` samples: <key>.jpg and <key>.cls."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(count):
            key = f"{shard:07d}-{i:05d}"
            for ext, data in (("jpg", template_jpeg((shard * count + i) % 64)), ("cls", str(i % 1000).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class SyntheticShards(AbstractFileSystem):
    """fsspec file system `synth://bench/<shard>-<count>.tar`: the file's bytes are made when it is opened."""

    protocol = "synth"

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        return {"name": path, "size": 0, "type": "file" if path.endswith(".tar") else "directory"}

    def _open(self, path, mode="rb", **kwargs):
        shard, count = Path(self._strip_protocol(path)).stem.split("-")
        return io.BytesIO(synthetic_tar(int(shard), int(count)))


def register_synthetic() -> None:
    """Make synth:// known in this process (a Ray worker_process_setup_hook)."""
    fsspec.register_implementation("synth", SyntheticShards, clobber=True)


def synthetic_urls(n: int) -> list[str]:
    return [
        f"synth://bench/{s:07d}-{min(SHARD_RECORDS, n - s * SHARD_RECORDS)}.tar" for s in range(-(-n // SHARD_RECORDS))
    ]
