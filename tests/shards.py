"""Test helpers for building inputs: tar shards with any members (also hostile ones) and folder copies."""

from __future__ import annotations

import csv
import io
import shutil
import struct
import tarfile
import zlib
from pathlib import Path


def write_tar(path: Path, members: list[tuple[str, bytes]], format: int = tarfile.DEFAULT_FORMAT) -> Path:
    """A tar with exactly these (name, bytes) members, in order; names are not sanitised."""
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_labels(imagenet_sample: Path) -> dict[str, int]:
    """file name -> class index, from the sample's labels.csv."""
    with open(imagenet_sample / "labels.csv", newline="") as f:
        return {row["file"]: int(row["class_index"]) for row in csv.DictReader(f)}


def sample_files(imagenet_sample: Path, n: int | None = None) -> list[Path]:
    return sorted(imagenet_sample.glob("*.JPEG"))[:n]


def copy_subset(imagenet_sample: Path, dest: Path, n: int | None = None, with_labels: bool = True) -> Path:
    """Copy the first n sample images (and their labels.csv rows) into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sample_files(imagenet_sample, n)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    if with_labels:
        labels = sample_labels(imagenet_sample)
        rows = "".join(f"{f.name},{labels[f.name]}\n" for f in files)
        (dest / "labels.csv").write_text("file,class_index\n" + rows)
    return dest


def tar_of_samples(imagenet_sample: Path, path: Path, files: list[Path], with_labels: bool = True) -> Path:
    """A webdataset shard of sample images: <stem>.jpg (+ <stem>.cls)."""
    labels = sample_labels(imagenet_sample)
    members: list[tuple[str, bytes]] = []
    for f in files:
        members.append((f"{f.stem}.jpg", f.read_bytes()))
        if with_labels:
            members.append((f"{f.stem}.cls", str(labels[f.name]).encode()))
    return write_tar(path, members)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data: what a decompression bomb looks like
    to a decoder that checks sizes first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
