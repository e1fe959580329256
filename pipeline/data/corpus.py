"""The token corpus: its Parquet schema and metadata, the folder layout, the writer, readers and validation.

An output folder (any fsspec URL) holds
    data/<unit>-<j>.parquet   rows (SCHEMA), zstd; one or more files per input shard ("unit of work")
    _units/<unit>.json        commit marker of one input shard: counts, its files, its bad records
    _manifest.json            written when every input shard is committed: metadata, totals, per-shard counts
    _errors.parquet           written with the manifest: one row per bad record (ERRORS_SCHEMA)
A unit's files count only once its marker exists; the manifest exists only when the whole output is complete.

    ds = read_corpus("out/", k=32)                     # Ray Dataset, tokens truncated to 32
    loader = DataLoader(CorpusDataset("out/", k=32, shuffle=True, rank=r, world_size=w), batch_size=64,
                        num_workers=4)                 # (tokens LongTensor [64, 32], labels LongTensor [64])
    DataLoader(CorpusDataset("adaptive/"), batch_size=64, collate_fn=pad_collate)  # rows of their own lengths
"""

from __future__ import annotations

import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flextok.errors import UserInputError

PIPELINE_VERSION = "1"
DATA_DIR, UNITS_DIR, TMP_DIR = "data", "_units", "_tmp"
MANIFEST, ERRORS = "_manifest.json", "_errors.parquet"
NO_LABEL = -1  # what CorpusDataset yields for a null label

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # webdataset __key__ / relative path without extension
        pa.field("label", pa.int32()),  # class index; null when the input has none
        pa.field("tokens", pa.list_(pa.field("element", pa.uint16())), nullable=False),  # ordered; any prefix is valid
        pa.field("num_tokens", pa.int16(), nullable=False),  # len(tokens)
        pa.field("source", pa.string(), nullable=False),  # input shard URL
        pa.field("aug", pa.int16(), nullable=False),  # augmentation id, 0 = none (see pipeline.data.preprocess)
    ]
)
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("error_class", pa.string()),
        pa.field("message", pa.string()),
    ]
)
# Measured (uniform random tokens, 1000 rows of 256): tokens with BYTE_STREAM_SPLIT + zstd cost 2.0004 bytes per
# token (dictionary 1.03x, plain 1.26x of raw uint16). Keys are the next cost: plain + zstd level 19 is the
# smallest for keys in random order (5.6 bytes vs 7.2 with DELTA_BYTE_ARRAY for ImageNet-style keys); it is
# applied to that column only. store_schema=False drops the base64 Arrow schema (a second copy of the
# metadata) from each footer: the Parquet types alone read back as SCHEMA.
WRITE_OPTIONS = dict(
    compression="zstd",
    compression_level={"key": 19},
    use_dictionary=["label", "num_tokens", "source", "aug"],
    column_encoding={"tokens.list.element": "BYTE_STREAM_SPLIT", "key": "PLAIN"},
    write_statistics=["label", "num_tokens", "aug"],
    store_schema=False,
)
ROW_GROUP_ROWS = 16384


class CorpusError(UserInputError):
    """A folder or file that is not a (complete) corpus, or a request it cannot serve (e.g. k > K)."""


@dataclass(frozen=True)
class CorpusMeta:
    """Parquet key-value metadata of every data file (keys `flextok.<field>`, values as text)."""

    tokenizer: str  # name: the --model folder's name or hub id
    tokenizer_sha256: str  # flextok.checkpoint.weights_digest of its state dict
    codebook_size: int
    num_registers: int  # tokens the tokenizer makes per image
    num_tokens: int  # tokens stored per row (the first K)
    resolution: int
    augment: str
    preprocessing: str
    pipeline_version: str = PIPELINE_VERSION
    # Adaptive corpora only (pretokenize --adaptive): each row holds its own prefix, num_tokens is the ladder's
    # largest k. Empty for fixed-K corpora, whose metadata then has no such keys (as before they existed).
    adaptive_criterion: str = ""  # psnr | inception (pipeline.data.adaptive)
    adaptive_target: str = ""  # e.g. "24" (dB) or "0.1" (cosine distance)
    adaptive_ladder: str = ""  # the k's the search chose from, e.g. "1,2,4,8,16,32"
    adaptive_decoding: str = ""  # decoder settings the search scored with, e.g. "timesteps=25,guidance_scale=1"

    @property
    def adaptive(self) -> bool:
        return bool(self.adaptive_criterion)

    @property
    def ladder(self) -> list[int]:
        return [int(k) for k in self.adaptive_ladder.split(",")] if self.adaptive_ladder else [self.num_tokens]

    def to_kv(self) -> dict[str, str]:
        return {f"flextok.{k}": str(v) for k, v in asdict(self).items() if not (k.startswith("adaptive_") and not v)}

    @classmethod
    def from_kv(cls, kv: dict[bytes | str, bytes | str]) -> CorpusMeta:
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in kv.items()
        }
        values = {}
        for f in fields(cls):
            name = f"flextok.{f.name}"
            if name not in text and f.name.startswith("adaptive_"):
                continue  # a fixed-K corpus
            if name not in text:
                raise CorpusError(f"Parquet metadata lacks '{name}': not a flextok corpus file")
            values[f.name] = int(text[name]) if f.type == "int" else text[name]
        return cls(**values)


# ------------------------------------------------------------------------------------------ layout
def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def output_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of an output URL."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: dict, indent: int | None = None) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True, separators=(",", ": ") if indent else (",", ":"))
    fs.mv(tmp, path)


def read_markers(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict]:
    """unit name -> commit marker, for every committed unit."""
    markers = {}
    for path in sorted(fs.glob(join(root, UNITS_DIR, "*.json"))):
        with fs.open(path, "r") as f:
            marker = json.load(f)
        markers[marker["unit"]] = marker
    return markers


# ------------------------------------------------------------------------------------------ writing
def tokens_table(keys, labels, tokens: np.ndarray | pa.Array | pa.ChunkedArray, sources, augs) -> pa.Table:
    """The one builder of corpus rows (SCHEMA). `tokens`: ids [N, K] (any integer dtype, values < 65536), or a
    list column; the other columns: Python lists or Arrow columns. `num_tokens` is each row's length."""
    if isinstance(tokens, np.ndarray):
        N, K = tokens.shape
        flat = pa.array(np.ascontiguousarray(tokens, dtype=np.uint16).reshape(-1))
        tokens = pa.ListArray.from_arrays(pa.array(np.arange(0, (N + 1) * K, K, dtype=np.int32)), flat)
    tokens = tokens.cast(SCHEMA.field("tokens").type)

    def column(values, name: str) -> pa.Array | pa.ChunkedArray:
        kind = SCHEMA.field(name).type
        return values.cast(kind) if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, kind)

    columns = {name: column(v, name) for name, v in (("key", keys), ("label", labels), ("source", sources))}
    columns |= {"tokens": tokens, "num_tokens": pc.cast(pc.list_value_length(tokens), pa.int16())}
    columns["aug"] = column(augs, "aug")
    return pa.table({name: columns[name] for name in SCHEMA.names}, schema=SCHEMA)


def write_data_file(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, meta: CorpusMeta) -> None:
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, SCHEMA, **WRITE_OPTIONS) as writer:
        writer.write_table(table.cast(SCHEMA), row_group_size=ROW_GROUP_ROWS)
        writer.add_key_value_metadata(meta.to_kv())


def commit_unit(
    fs: fsspec.AbstractFileSystem,
    root: str,
    unit: str,
    table: pa.Table,
    meta: CorpusMeta,
    rows_per_file: int,
    marker: dict,
) -> dict:
    """Write one unit's rows as data files and then its marker; a unit counts only once its marker exists.

    Files go to _tmp/ first and are renamed into data/ under names fixed by the unit, so a crash at any
    point leaves either nothing of the unit that counts, or the whole unit."""
    fs.makedirs(join(root, TMP_DIR), exist_ok=True)
    fs.makedirs(join(root, DATA_DIR), exist_ok=True)
    fs.makedirs(join(root, UNITS_DIR), exist_ok=True)
    files = []
    for j, start in enumerate(range(0, table.num_rows, rows_per_file)):
        name = f"{unit}-{j:04d}.parquet"
        tmp = join(root, TMP_DIR, name)
        write_data_file(fs, tmp, table.slice(start, rows_per_file), meta)
        fs.mv(tmp, join(root, DATA_DIR, name))
        files.append(f"{DATA_DIR}/{name}")
    marker = {**marker, "unit": unit, "files": files, "written": table.num_rows, "metadata": meta.to_kv()}
    write_json_atomic(fs, join(root, UNITS_DIR, f"{unit}.json"), marker)
    return marker


def write_summary(fs: fsspec.AbstractFileSystem, root: str, markers: dict[str, dict], meta: CorpusMeta) -> dict:
    """_errors.parquet and then _manifest.json, from the committed markers (the manifest comes last: its
    presence says the output is complete)."""
    units = [markers[u] for u in sorted(markers)]
    errors = [e for m in units for e in m["errors"]]
    table = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
    with fs.open(join(root, ERRORS), "wb") as f:
        pq.write_table(table, f, compression="zstd", store_schema=False)
    shards = [{k: m[k] for k in ("url", "kind", "index", "unit", "read", "written", "failed", "files")} for m in units]
    manifest = {
        "pipeline_version": PIPELINE_VERSION,
        "metadata": meta.to_kv(),
        "complete": True,
        "totals": {
            "shards": len(units),
            "read": sum(m["read"] for m in units),
            "written": sum(m["written"] for m in units),
            "failed": sum(m["failed"] for m in units),
            "files": sum(len(m["files"]) for m in units),
        },
        "shards": shards,
    }
    if meta.adaptive:
        manifest["adaptive"] = merge_adaptive_stats([m.get("adaptive", {}) for m in units])
    write_json_atomic(fs, join(root, MANIFEST), manifest, indent=1)
    return manifest


def write_table_corpus(
    path: str, units: pa.Table | dict[str, pa.Table], meta: CorpusMeta, rows_per_file: int = 100_000
) -> dict:
    """Write in-memory rows (tokens_table) as a complete corpus, the way the job commits them: per unit its data
    files and marker, then _errors.parquet and _manifest.json. For tests and benches; returns the manifest.
    Each unit counts its distinct keys as the records read (no bad records)."""
    fs, root = output_fs(path)
    units = {"table": units} if isinstance(units, pa.Table) else units
    for unit, table in units.items():
        url = table.column("source")[0].as_py() if table.num_rows else unit
        read = len(pc.unique(table.column("key")))
        marker = {"url": url, "kind": "table", "index": 0, "digest": "", "read": read, "failed": 0, "errors": []}
        commit_unit(fs, root, unit, table, meta, rows_per_file, marker)
    return write_summary(fs, root, read_markers(fs, root), meta)


def adaptive_stats(num_tokens: np.ndarray, missed: np.ndarray, decodes: np.ndarray) -> dict:
    """One unit's adaptive summary: histogram of chosen k (keys as text, for JSON), misses, decoder calls."""
    ks, counts = np.unique(num_tokens, return_counts=True)
    return {
        "k_histogram": {str(int(k)): int(c) for k, c in zip(ks, counts, strict=True)},
        "missed": int(missed.sum()),
        "decodes": int(decodes.sum()),
        "images": len(num_tokens),
    }


def merge_adaptive_stats(parts: list[dict]) -> dict:
    """Sum of adaptive_stats over units (the manifest's `adaptive`)."""
    hist: Counter = Counter()
    for part in parts:
        hist.update({k: v for k, v in part.get("k_histogram", {}).items()})
    total = {name: sum(p.get(name, 0) for p in parts) for name in ("missed", "decodes", "images")}
    ks = sorted(hist, key=int)
    mean = sum(int(k) * hist[k] for k in ks) / max(1, sum(hist.values()))
    return {"k_histogram": {k: hist[k] for k in ks}, **total, "mean_tokens": mean}


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Chunk:
    """One row group of one data file: the unit of corpus reading."""

    path: str
    row_group: int
    rows: int


def corpus_files(path: str) -> tuple[fsspec.AbstractFileSystem, list[str], CorpusMeta]:
    """(filesystem, committed data file paths, metadata) of a corpus folder."""
    fs, root = output_fs(path)
    markers = read_markers(fs, root)
    if not markers:
        raise CorpusError(f"{path}: no committed units ({UNITS_DIR}/*.json): not a flextok corpus, or empty")
    files = [join(root, f) for u in sorted(markers) for f in markers[u]["files"]]
    meta = CorpusMeta.from_kv(next(iter(markers.values()))["metadata"])
    return fs, files, meta


def _check_k(k: int | None, meta: CorpusMeta) -> int:
    if k is None:
        return meta.num_tokens
    if not 1 <= k <= meta.num_tokens:
        raise CorpusError(f"k={k}: this corpus stores {meta.num_tokens} tokens per row, so 1 <= k <= {meta.num_tokens}")
    return k


def truncate(table: pa.Table, k: int) -> pa.Table:
    """Keep the first k tokens of every row."""
    tokens = pc.list_slice(table.column("tokens"), 0, k)
    table = table.set_column(table.schema.get_field_index("tokens"), SCHEMA.field("tokens"), tokens)
    num = pc.min_element_wise(table.column("num_tokens"), pa.scalar(k, pa.int16()))
    return table.set_column(table.schema.get_field_index("num_tokens"), SCHEMA.field("num_tokens"), num)


def read_corpus(path: str, k: int | None = None):
    """The corpus as a Ray Dataset (SCHEMA columns), tokens truncated to the first k."""
    import ray

    fs, files, meta = corpus_files(path)
    k = _check_k(k, meta)
    ds = ray.data.read_parquet(files, filesystem=fs, schema=SCHEMA)
    if k == meta.num_tokens:
        return ds
    return ds.map_batches(truncate, fn_kwargs={"k": k}, batch_format="pyarrow", batch_size=None)


class CorpusDataset(IterableDataset):
    """(tokens LongTensor [k], label int) for AR training; label is NO_LABEL (-1) when null.

    Sharding: the rows, taken in row-group order (shuffled per epoch with `seed + epoch` when `shuffle`),
    are cut into world_size * num_workers contiguous slices, one per (rank, DataLoader worker). With
    `even=True` every slice has ceil(N / slices) rows (wrapping around to the start, as DistributedSampler
    pads), so every rank sees the same number of rows; `even=False` covers each row exactly once.
    With `shuffle`, rows are also mixed through a buffer of `shuffle_buffer` rows. Call `set_epoch`."""

    def __init__(
        self,
        path: str,
        k: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
        shuffle_buffer: int = 16384,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.fs, files, self.meta = corpus_files(path)
        self.k = _check_k(k, self.meta)
        self.chunks = [Chunk(p, i, n) for p in files for i, n in enumerate(self._row_groups(p))]
        self.num_rows = sum(c.rows for c in self.chunks)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.even, self.shuffle_buffer, self.epoch = even, shuffle_buffer, 0

    def _row_groups(self, path: str) -> list[int]:
        with self.fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata
            return [md.row_group(i).num_rows for i in range(md.num_row_groups)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def slice_bounds(self, slice_index: int, num_slices: int) -> tuple[int, int]:
        """[start, stop) of one slice in the epoch's row order (stop may pass N: wraps around)."""
        N = self.num_rows
        if self.even:
            L = math.ceil(N / num_slices)
            return slice_index * L, (slice_index + 1) * L
        return slice_index * N // num_slices, (slice_index + 1) * N // num_slices

    def rows_per_rank(self, num_workers: int = 0) -> int:
        """Rows this rank yields per epoch with a DataLoader of `num_workers` workers (all together)."""
        workers = max(1, num_workers)
        bounds = [self.slice_bounds(self.rank * workers + w, self.world_size * workers) for w in range(workers)]
        return sum(stop - start for start, stop in bounds)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        start, stop = self.slice_bounds(self.rank * workers + worker, self.world_size * workers)
        order = list(range(len(self.chunks)))
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            rng.shuffle(order)
        rows = self._rows(order, start, stop)
        if self.shuffle:
            rows = _shuffle_buffer(rows, self.shuffle_buffer, rng)
        for tokens, label in rows:
            yield torch.from_numpy(tokens.astype(np.int64)), label

    def _rows(self, order: list[int], start: int, stop: int) -> Iterator[tuple[np.ndarray, int]]:
        """Rows [start, stop) of the concatenation of chunks in `order`, wrapping around past the end."""
        N = self.num_rows
        position = 0
        while position < stop and N:
            for c in order:
                chunk = self.chunks[c]
                lo, hi = max(start, position), min(stop, position + chunk.rows)
                if lo < hi:
                    tokens, labels = self._read_chunk(chunk)
                    for r in range(lo - position, hi - position):
                        yield tokens[r], labels[r]
                position += chunk.rows
                if position >= stop:
                    return

    def _read_chunk(self, chunk: Chunk) -> tuple[np.ndarray, list[int]]:
        with self.fs.open(chunk.path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(chunk.row_group, columns=["tokens", "label"])
        tokens = table.column("tokens").combine_chunks()
        lengths = pc.list_value_length(tokens).to_numpy()
        if lengths.min() < self.k and not self.meta.adaptive:
            raise ValueError(f"{chunk.path}: a row has {lengths.min()} tokens, fewer than k={self.k}")
        if (lengths == lengths[0]).all():  # the usual case: one stored length -> one reshape
            flat = tokens.flatten().to_numpy()  # [rows * K]
            array = flat.reshape(len(lengths), -1)[:, : self.k]  # [rows, k]
        elif (lengths >= self.k).all():
            array = np.stack([np.asarray(t[: self.k], np.uint16) for t in tokens.to_pylist()])
        else:  # an adaptive corpus: rows keep their own lengths, at most k (batch them with pad_collate)
            array = [np.asarray(t[: self.k], np.uint16) for t in tokens.to_pylist()]
        labels = [NO_LABEL if v is None else v for v in table.column("label").to_pylist()]
        return array, labels


def pad_collate(rows: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collate for CorpusDataset rows of different lengths (adaptive corpora):
    -> (tokens LongTensor [B, T] zero-padded to the longest, labels [B], lengths [B])."""
    lengths = torch.tensor([len(t) for t, _ in rows])
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, (t, _) in enumerate(rows):
        tokens[i, : len(t)] = t
    return tokens, torch.tensor([label for _, label in rows]), lengths


def _shuffle_buffer(rows: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buffer = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------------ validation
@dataclass
class Validation:
    rows: int = 0
    files: int = 0
    tokens: int = 0
    bytes_on_disk: int = 0
    shards: int = 0
    read: int = 0
    failed: int = 0
    labels: Counter = field(default_factory=Counter)  # label -> rows; None counts null labels
    lengths: Counter = field(default_factory=Counter)  # num_tokens -> rows
    problems: list[str] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_on_disk / max(1, self.tokens)


def validate_corpus(path: str, max_examples: int = 5) -> Validation:
    """Check a finished corpus against its manifest: files, counts, metadata, token range and lengths,
    duplicate (key, aug) rows, the errors file. Problems are listed, not raised."""
    fs, root = output_fs(path)
    v = Validation()
    if not fs.exists(join(root, MANIFEST)):
        v.problems.append(f"no {MANIFEST}: the job has not finished (or this is not a corpus folder)")
        return v
    with fs.open(join(root, MANIFEST), "r") as f:
        manifest = json.load(f)
    meta = CorpusMeta.from_kv(manifest["metadata"])
    listed = {f for s in manifest["shards"] for f in s["files"]}
    on_disk = {posixpath.relpath(p, root) for p in fs.glob(join(root, DATA_DIR, "*.parquet"))}
    for extra in sorted(on_disk - listed)[:max_examples]:
        v.problems.append(f"{extra}: data file not in the manifest (left over from a crash?)")
    seen: set[tuple[str, int]] = set()
    duplicates: list[tuple[str, int]] = []
    copies = _copies_per_image(meta.augment)
    for shard in manifest["shards"]:
        v.shards += 1
        v.read += shard["read"]
        v.failed += shard["failed"]
        rows = 0
        for rel in shard["files"]:
            if rel not in on_disk:
                v.problems.append(f"{rel}: listed in the manifest but missing")
                continue
            table, file_meta = _read_data_file(fs, join(root, rel))
            v.files += 1
            rows += table.num_rows
            if file_meta != meta:
                v.problems.append(f"{rel}: metadata differs from the manifest's")
            if table.schema.remove_metadata() != SCHEMA:
                v.problems.append(f"{rel}: schema {table.schema.remove_metadata()} is not the corpus schema")
                continue
            v.problems += _check_rows(rel, table, meta)
            v.tokens += pc.sum(table.column("num_tokens")).as_py() or 0
            v.lengths.update(table.column("num_tokens").to_pylist())
            v.labels.update(table.column("label").to_pylist())
            for key, aug in zip(table.column("key").to_pylist(), table.column("aug").to_pylist(), strict=True):
                if (key, aug) in seen:
                    duplicates.append((key, aug))
                seen.add((key, aug))
        v.rows += rows
        if rows != shard["written"]:
            v.problems.append(f"{shard['url']}: manifest says {shard['written']} rows written, files hold {rows}")
        if copies and (shard["read"] - shard["failed"]) * copies != shard["written"]:
            v.problems.append(
                f"{shard['url']}: read {shard['read']} - failed {shard['failed']} records does not match "
                f"{shard['written']} rows at {copies} per image"
            )
    if duplicates:
        v.problems.append(f"{len(duplicates)} duplicate (key, aug) rows, e.g. {duplicates[:max_examples]}")
    if meta.adaptive:
        listed_hist = {int(k): n for k, n in manifest.get("adaptive", {}).get("k_histogram", {}).items()}
        if listed_hist != dict(v.lengths):
            v.problems.append(f"the manifest's adaptive k histogram {listed_hist} != the rows' {dict(v.lengths)}")
    if fs.exists(join(root, ERRORS)):
        with fs.open(join(root, ERRORS), "rb") as f:
            n_errors = pq.ParquetFile(f).metadata.num_rows
        if n_errors != v.failed:
            v.problems.append(f"{ERRORS} has {n_errors} rows, the manifest counts {v.failed} failed records")
    else:
        v.problems.append(f"no {ERRORS}")
    v.bytes_on_disk = sum(fs.size(p) for p in fs.find(root))
    return v


def _copies_per_image(augment: str) -> int | None:
    from .preprocess import AUGMENT_MODES

    return 1 if augment == "random-flip" else len(AUGMENT_MODES.get(augment, ())) or None


def _read_data_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Table, CorpusMeta | None]:
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    try:
        return table, CorpusMeta.from_kv(table.schema.metadata or {})
    except ValueError:
        return table, None


def _check_rows(rel: str, table: pa.Table, meta: CorpusMeta) -> list[str]:
    problems = []
    lengths = pc.list_value_length(table.column("tokens"))
    if not pc.all(pc.equal(lengths, pc.cast(table.column("num_tokens"), pa.int32()))).as_py() and table.num_rows:
        problems.append(f"{rel}: num_tokens differs from len(tokens)")
    if meta.adaptive:
        off = sorted(set(lengths.to_pylist()) - set(meta.ladder))
        if off:
            problems.append(f"{rel}: rows hold {off} tokens, not on the adaptive ladder {meta.ladder}")
    elif table.num_rows and (pc.min(lengths).as_py() != meta.num_tokens or pc.max(lengths).as_py() != meta.num_tokens):
        problems.append(f"{rel}: rows should hold {meta.num_tokens} tokens, found {pc.min_max(lengths).as_py()}")
    values = pc.list_flatten(table.column("tokens"))
    if len(values) and pc.max(values).as_py() >= meta.codebook_size:
        problems.append(f"{rel}: token id {pc.max(values).as_py()} >= codebook size {meta.codebook_size}")
    return problems
