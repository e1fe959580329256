"""Image sources -> records (key, image bytes, label, source), through fsspec URLs.

    shards = expand_inputs(["data/train-{000000..000099}.tar", "more/*.parquet", "photos/"])
    for rec in iter_records(shards[0]):        # Record(key, data, label, source, error, error_class)
        ...
    ds = image_dataset(urls, resolution=256)   # Ray Dataset of center-cropped uint8 images (+ error rows)

Three kinds of input, each a unit of work (an "input shard"):
- webdataset: a `.tar` (or `.tar.gz`/`.tgz`) of samples `<key>.<ext>`; the image is the first of
  `.jpg/.jpeg/.png/.webp`, the label an optional `.cls` (an integer as text). key = webdataset `__key__`.
- folder: image files under a directory, recursively; key = path relative to the folder without its extension.
  Labels come from a CSV (`file,class_index,...`; `label` also accepted as the class column): the folder's own
  `labels.csv` or an explicit one. A folder is cut into chunks of `folder_chunk` files (sorted paths), one
  input shard each.
- parquet: a `.parquet` file with an image-bytes column (`image`, `jpg`, `png`, `webp`, `jpeg`, `img`, `bytes`;
  binary, or a struct with a `bytes` field as Hugging Face datasets write it), optional `key`/`__key__`/`id`
  (else the row number, 9 digits) and `label`/`cls`/`class_index`.

A bad record never stops a shard: it comes out as a Record with `error`/`error_class` set and `data` None.
A truncated or corrupt shard yields its readable records, then one error record.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from webdataset.tariterators import base_plus_ext

from flextok.errors import UserInputError

from .preprocess import IMAGE_EXTENSIONS, ImageDecodeError, augment_ids, augmented_views, decode_image

ShardKind = Literal["webdataset", "folder", "parquet"]
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FOLDER_CHUNK = 1000
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "jpeg", "img", "bytes")
PARQUET_KEY_COLUMNS = ("key", "__key__", "id")
PARQUET_LABEL_COLUMNS = ("label", "cls", "class_index")
MISSING_LABEL = -1  # image_dataset's label for "no label" (the corpus itself stores null)

# error classes of records (besides the exception class names of decoding, e.g. ImageDecodeError, ImageTooLargeError)
UNSAFE_PATH = "UnsafePath"  # tar member name that is absolute or contains '..'
NOT_A_FILE = "NotARegularFile"  # tar member that is a link or a device
NO_IMAGE = "NoImage"  # sample without an image member / null image bytes
BAD_LABEL = "BadLabel"  # .cls / label value that is not an int32 integer
DUPLICATE_KEY = "DuplicateKey"  # a second record with a key already seen in this shard
CORRUPT_SHARD = "CorruptShard"  # the shard could not be read to its end (truncated tar, bad parquet)
READ_ERROR = "ReadError"  # a file that could not be opened or read
BAD_KEY = "BadKey"  # a key (tar member name) that is not valid UTF-8
TOO_LARGE = "MemberTooLarge"  # a tar member above MAX_MEMBER_BYTES: skipped unread, its sample is an error record
MAX_MEMBER_BYTES = 64 * 2**20  # no image or label file of a sample needs more; a bigger one would fill memory
_INT32 = (-(2**31), 2**31 - 1)


class InputError(UserInputError):
    """An input URL that cannot be used (nothing matches, unknown kind, bad labels CSV)."""


@dataclass(frozen=True)
class InputShard:
    url: str
    kind: ShardKind
    files: tuple[str, ...] = ()  # folder: this chunk's image paths, relative to url (posix)
    labels: tuple[int | None, ...] = ()  # folder: one label per file (None when the CSV has none)
    index: int = 0  # folder: chunk number

    @property
    def id(self) -> str:
        """Stable name of this unit of work."""
        return f"{self.url}#{self.index:06d}" if self.kind == "folder" else self.url

    @property
    def digest(self) -> str:
        """Identity of the shard's contents as planned (folder chunks: the file list and labels)."""
        return hashlib.sha256(json.dumps([self.id, self.files, self.labels]).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> InputShard:
        d = json.loads(text)
        return cls(d["url"], d["kind"], tuple(d["files"]), tuple(d["labels"]), d["index"])


@dataclass(frozen=True)
class Record:
    key: str
    data: bytes | None
    label: int | None
    source: str
    error: str | None = None  # why the record is unusable; None for a good record
    error_class: str | None = None


# ------------------------------------------------------------------------------------------ expansion
def _fs_and_paths(url: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    import braceexpand

    fs, _ = fsspec.core.url_to_fs(url)
    paths: list[str] = []
    for pattern in braceexpand.braceexpand(url):
        _, path = fsspec.core.url_to_fs(pattern)
        if any(c in path for c in "*?["):
            paths += sorted(fs.glob(path))
        elif fs.exists(path):
            paths.append(path)
        else:
            raise InputError(f"input not found: {pattern}")
    if not paths:
        raise InputError(f"no files match {url}")
    return fs, paths


def _full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def expand_inputs(urls: list[str], labels: str | None = None, folder_chunk: int = FOLDER_CHUNK) -> list[InputShard]:
    """Input URLs (globs and `{a..b}` ranges allowed) -> input shards, in order, without repeats.
    `labels`: a CSV for folder inputs (default: each folder's own labels.csv, if any)."""
    shards: dict[str, InputShard] = {}
    for url in urls:
        fs, paths = _fs_and_paths(url)
        for path in paths:
            full = _full_url(fs, path)
            if fs.isdir(path):
                for shard in _folder_shards(fs, path, full, labels, folder_chunk):
                    shards.setdefault(shard.id, shard)
            elif path.endswith(TAR_SUFFIXES):
                shards.setdefault(full, InputShard(full, "webdataset"))
            elif path.endswith(".parquet"):
                shards.setdefault(full, InputShard(full, "parquet"))
            else:
                raise InputError(f"{full}: not a folder, a .tar/.tar.gz/.tgz shard or a .parquet file")
    return list(shards.values())


def _folder_shards(
    fs: fsspec.AbstractFileSystem, root: str, url: str, labels: str | None, chunk: int
) -> list[InputShard]:
    root = root.rstrip("/")
    files = []
    for path in fs.find(root):
        rel = path[len(root) + 1 :]
        if _is_image_name(rel) and not any(part.startswith(".") for part in rel.split("/")):
            files.append(rel)
    files.sort()
    if not files:
        raise InputError(f"{url}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    csv_url = labels or (_full_url(fs, f"{root}/labels.csv") if fs.exists(f"{root}/labels.csv") else None)
    table = read_labels_csv(csv_url) if csv_url else {}
    file_labels = [table.get(rel, table.get(_strip_ext(rel))) for rel in files]
    return [
        InputShard(url, "folder", tuple(files[i : i + chunk]), tuple(file_labels[i : i + chunk]), i // chunk)
        for i in range(0, len(files), chunk)
    ]


def read_labels_csv(url: str) -> dict[str, int]:
    """CSV with a header: `file` (path relative to the folder, with or without extension) and `class_index`
    (or `label`) -> {file: label}."""
    try:
        with fsspec.open(url, "r", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"labels CSV {url}: cannot read ({type(e).__name__}: {e})") from e
    if not rows:
        return {}
    label_col = next((c for c in ("class_index", "label") if c in rows[0]), None)
    if "file" not in rows[0] or label_col is None:
        raise InputError(f"labels CSV {url}: needs columns 'file' and 'class_index' (or 'label')")
    table: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        try:
            table[row["file"]] = to_label(row[label_col])
        except (TypeError, ValueError):
            raise InputError(
                f"labels CSV {url} line {line}: {label_col}={row[label_col]!r} is not an int32 integer"
            ) from None
    return table


def to_label(text: str | int) -> int:
    """A class label: an integer in int32 range (ValueError otherwise)."""
    label = int(text)
    if not _INT32[0] <= label <= _INT32[1]:
        raise ValueError(f"label {label} is outside int32")
    return label


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def _strip_ext(name: str) -> str:
    return name.rsplit(".", 1)[0]


# ------------------------------------------------------------------------------------------ records
def iter_records(shard: InputShard) -> Iterator[Record]:
    """All records of one input shard, in shard order; bad ones carry `error` and `error_class`."""
    readers = {"webdataset": _tar_records, "folder": _folder_records, "parquet": _parquet_records}
    seen: set[str] = set()
    for rec in readers[shard.kind](shard):
        if not _is_utf8(rec.key):  # tar names are decoded with surrogate escapes
            key = rec.key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            rec = _error(key, shard, BAD_KEY, f"key is not valid UTF-8: {rec.key!r}", rec.label)
        if rec.error is None and rec.key in seen:
            rec = _error(rec.key, shard, DUPLICATE_KEY, "another record of this shard has the same key", rec.label)
        seen.add(rec.key)
        yield rec


def _error(key: str, shard: InputShard, cls: str, msg: str, label: int | None = None) -> Record:
    return Record(key, None, label, shard.url, msg, cls)


def _exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _tar_records(shard: InputShard) -> Iterator[Record]:
    """Members grouped into samples by webdataset's key rule (`base_plus_ext`: key = up to the first dot).
    Read with tarfile, not webdataset's reader, which skips links silently and reads members whole."""
    key, parts = None, {}
    try:
        with fsspec.open(shard.url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if _unsafe_name(member.name):
                    yield _error(member.name, shard, UNSAFE_PATH, f"tar member name escapes the shard: {member.name!r}")
                    continue
                if not member.isfile():
                    yield _error(member.name, shard, NOT_A_FILE, f"tar member {member.name!r} is a link or device")
                    continue
                base, ext = base_plus_ext(member.name)
                if base is None:
                    continue  # no extension: not part of a sample (as in webdataset)
                if base != key:
                    if key is not None:
                        yield _sample(key, parts, shard)
                    key, parts = base, {}
                if member.size > MAX_MEMBER_BYTES:  # left unread: the stream skips it
                    parts[ext.lower()] = TooLarge(member.name, member.size, MAX_MEMBER_BYTES)
                else:
                    parts[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield _sample(key, parts, shard)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        where = f"in sample {key!r}" if key is not None else "before the first sample"
        yield _error(key or "", shard, CORRUPT_SHARD, f"shard unreadable {where}: {_exc(e)}")


def _unsafe_name(name: str) -> bool:
    return not name or name.startswith("/") or ".." in name.replace("\\", "/").split("/")


@dataclass(frozen=True)
class TooLarge:
    """Stands in for a tar member that was not read because of its size."""

    name: str
    size: int
    limit: int


def _sample(key: str, parts: dict[str, bytes | TooLarge], shard: InputShard) -> Record:
    big = next((p for p in parts.values() if isinstance(p, TooLarge)), None)
    if big is not None:
        return _error(key, shard, TOO_LARGE, f"tar member {big.name!r} has {big.size} bytes (limit {big.limit})")
    label = None
    if "cls" in parts:
        try:
            label = to_label(parts["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            return _error(key, shard, BAD_LABEL, f".cls is not an int32 integer: {parts['cls'][:32]!r}")
    data = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if data is None:
        return _error(key, shard, NO_IMAGE, f"sample has no image member (has {sorted(parts)})", label)
    return Record(key, data, label, shard.url)


def _folder_records(shard: InputShard) -> Iterator[Record]:
    fs, root = fsspec.core.url_to_fs(shard.url)
    for rel, label in zip(shard.files, shard.labels or (None,) * len(shard.files), strict=True):
        key = _strip_ext(rel)
        try:
            yield Record(key, fs.cat_file(f"{root.rstrip('/')}/{rel}"), label, shard.url)
        except OSError as e:
            yield _error(key, shard, READ_ERROR, _exc(e), label)


def _parquet_records(shard: InputShard) -> Iterator[Record]:
    row = 0
    try:
        with fsspec.open(shard.url, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
            if image_col is None:
                yield _error("", shard, NO_IMAGE, f"no image column (looked for {PARQUET_IMAGE_COLUMNS}) in {names}")
                return
            key_col = next((c for c in PARQUET_KEY_COLUMNS if c in names), None)
            label_col = next((c for c in PARQUET_LABEL_COLUMNS if c in names), None)
            columns = [c for c in (image_col, key_col, label_col) if c is not None]
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                images = _image_bytes(batch.column(image_col))
                keys = batch.column(key_col).to_pylist() if key_col else [None] * batch.num_rows
                labels = batch.column(label_col).to_pylist() if label_col else [None] * batch.num_rows
                for data, key, label in zip(images, keys, labels, strict=True):
                    key = f"{row:09d}" if key is None else str(key)
                    row += 1
                    if label is not None and not (isinstance(label, int) and _INT32[0] <= label <= _INT32[1]):
                        yield _error(key, shard, BAD_LABEL, f"label {label!r} is not an int32 integer")
                    elif data is None:
                        yield _error(key, shard, NO_IMAGE, f"null image bytes in column '{image_col}'", label)
                    else:
                        yield Record(key, data, label, shard.url)
    except (OSError, pa.ArrowException, ValueError) as e:
        yield _error(f"{row:09d}", shard, CORRUPT_SHARD, f"shard unreadable at row {row}: {_exc(e)}")


def _image_bytes(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):  # Hugging Face datasets' Image feature: struct<bytes, path>
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        column = column.field("bytes")
    return column.to_pylist()


# ------------------------------------------------------------------------------------------ decoded rows
@dataclass
class DecodedRow:
    record: int  # index of the record within its shard
    key: str
    label: int | None
    source: str
    aug: int
    image: np.ndarray | None  # uint8 [R, R, 3]; None on error rows
    error_class: str | None = None
    error: str | None = None


def decode_records(shard: InputShard, resolution: int, augment: str = "none") -> Iterator[DecodedRow]:
    """Records -> one row per augmentation view of each good image, one error row per bad record."""
    for i, rec in enumerate(iter_records(shard)):
        if rec.error is not None:
            yield DecodedRow(i, rec.key, rec.label, rec.source, 0, None, rec.error_class, rec.error)
            continue
        try:
            augs = augment_ids(augment, rec.key)
            views = augmented_views(decode_image(rec.data), resolution, augs)
        except ImageDecodeError as e:
            yield DecodedRow(i, rec.key, rec.label, rec.source, 0, None, type(e).__name__, str(e))
            continue
        for aug, view in zip(augs, views, strict=True):
            yield DecodedRow(i, rec.key, rec.label, rec.source, aug, view)


def batched(rows: Iterator[DecodedRow], n: int) -> Iterator[list[DecodedRow]]:
    batch: list[DecodedRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def image_table(rows: list[DecodedRow], resolution: int) -> pa.Table:
    """image_dataset's rows: key, label (int32, -1 = none), image (uint8 [R, R, 3] tensor), source,
    aug (int16), error_class and error (null on good rows; error rows have an all-zero image)."""
    from ray.data.extensions import ArrowTensorArray

    zeros = np.zeros((resolution, resolution, 3), np.uint8)
    images = np.stack([r.image if r.image is not None else zeros for r in rows])  # [B, R, R, 3]
    return pa.table(
        {
            "key": pa.array([r.key for r in rows], pa.string()),
            "label": pa.array([MISSING_LABEL if r.label is None else r.label for r in rows], pa.int32()),
            "image": ArrowTensorArray.from_numpy(images),
            "source": pa.array([r.source for r in rows], pa.string()),
            "aug": pa.array([r.aug for r in rows], pa.int16()),
            "error_class": pa.array([r.error_class for r in rows], pa.string()),
            "error": pa.array([r.error for r in rows], pa.string()),
        }
    )


def _decode_shards(batch: pa.Table, resolution: int, augment: str, block_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of shard descriptors -> image tables of at most `block_rows` rows."""
    for text in batch.column("shard").to_pylist():
        rows = decode_records(InputShard.from_json(text), resolution, augment)
        for chunk in batched(rows, block_rows):
            yield image_table(chunk, resolution)


def shard_dataset(shards: list[InputShard]):
    """A Ray Dataset with one row (column `shard`: JSON) per input shard, one block each."""
    import ray

    return ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=max(1, len(shards)))


def image_dataset(
    urls: list[str],
    resolution: int,
    augment: str = "none",
    labels: str | None = None,
    block_rows: int = 64,
    folder_chunk: int = 256,
):
    """Ray Dataset of ADM-center-cropped images: rows key, label (int32, -1 when none), image (uint8
    [R, R, 3]), source, aug, error_class, error. Error rows (error not null, image all zeros) keep bad
    records visible: `good_rows(ds)` / `error_rows(ds)` split them."""
    shards = expand_inputs(urls, labels, folder_chunk)
    kwargs = {"resolution": resolution, "augment": augment, "block_rows": block_rows}
    return shard_dataset(shards).map_batches(_decode_shards, batch_size=1, batch_format="pyarrow", fn_kwargs=kwargs)


def good_rows(ds):
    return ds.filter(lambda row: row["error"] is None)


def error_rows(ds):
    return ds.filter(lambda row: row["error"] is not None)
