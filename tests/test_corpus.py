"""The corpus format: size on disk, metadata, reading back (Ray Dataset and IterableDataset), validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shards import sample_labels
from torch.utils.data import DataLoader

from pipeline.data.corpus import (
    CorpusDataset,
    CorpusMeta,
    read_corpus,
    tokens_table,
    validate_corpus,
    write_table_corpus,
)
from pipeline.data.preprocess import PREPROCESSING

META = CorpusMeta(
    tokenizer="EPFL-VILAB/flextok_d18_d28_in1k",
    tokenizer_sha256="0" * 64,
    codebook_size=64000,
    num_registers=256,
    num_tokens=256,
    resolution=256,
    augment="none",
    preprocessing=PREPROCESSING,
)


def make_corpus(out: Path, units: dict[str, tuple[list[str], list[int | None], np.ndarray]], meta=META, **kw) -> Path:
    """Commit units {name: (keys, labels, tokens [N, K])} and write the summary, as the job does."""
    tables = {}
    for unit, (keys, labels, tokens) in units.items():
        source = f"s3://bucket/imagenet/{unit}.tar"
        tables[unit] = tokens_table(keys, labels, tokens, [source] * len(keys), [0] * len(keys))
    write_table_corpus(str(out), tables, meta, kw.get("rows_per_file", 100_000))
    return out


def numbered_corpus(out: Path, rows_per_unit: list[int], k: int = 8, **kw) -> tuple[Path, dict[str, tuple]]:
    """Units of rows whose first token is the row's global number (so reading order is visible)."""
    units, start = {}, 0
    for u, n in enumerate(rows_per_unit):
        ids = np.arange(start, start + n)
        tokens = np.stack([ids] + [ids % 7 + j for j in range(1, k)], axis=1)  # [n, k]
        labels = [None if i % 5 == 0 else int(i % 1000) for i in ids]
        units[f"u{u}"] = ([f"key{i:05d}" for i in ids], labels, tokens)
        start += n
    return make_corpus(out, units, meta_with(num_tokens=k, num_registers=k), **kw), units


def meta_with(**changes) -> CorpusMeta:
    return CorpusMeta(**{**META.__dict__, **changes})


# ------------------------------------------------------------------------------------------ size on disk
def imagenet_keys(imagenet_sample: Path, n: int, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """ImageNet-train style keys (wnid/wnid_number) over the sample's classes."""
    labels = sample_labels(imagenet_sample)
    wnids = sorted(labels)
    picks = rng.integers(len(wnids), size=n)
    keys = [f"{wnids[p][:9]}/{wnids[p][:9]}_{rng.integers(1, 40000)}" for p in picks]
    return keys, [labels[wnids[p]] for p in picks]


def test_bytes_per_token_at_256_random_tokens_is_at_most_2_05(tmp_path: Path, imagenet_sample: Path):
    rng = np.random.default_rng(0)
    units = {}
    for u in range(4):
        keys, labels = imagenet_keys(imagenet_sample, 1000, rng)
        units[f"train-{u:06d}"] = (keys, labels, rng.integers(0, 64000, size=(1000, 256)))
    out = make_corpus(tmp_path / "out", units)
    v = validate_corpus(str(out))
    assert v.problems == [] and v.tokens == 4000 * 256
    assert v.bytes_on_disk == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert 1.99 <= v.bytes_per_token <= 2.05  # log2(64000) / 8 = 1.996 is the floor for uniform tokens


def test_tokens_column_is_uint16_lists_with_byte_stream_split(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [10])
    pf = pq.ParquetFile(next((out / "data").glob("*.parquet")))
    assert str(pf.schema_arrow.field("tokens").type) == "list<element: uint16>"
    chunk = pf.metadata.row_group(0).column(pf.schema_arrow.get_field_index("tokens"))
    assert chunk.path_in_schema == "tokens.list.element"
    assert "BYTE_STREAM_SPLIT" in chunk.encodings and chunk.compression == "ZSTD"


def test_rows_per_file_splits_a_unit(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [25], rows_per_file=10)
    assert [pq.ParquetFile(f).metadata.num_rows for f in sorted((out / "data").glob("*"))] == [10, 10, 5]


# ------------------------------------------------------------------------------------------ metadata
def test_metadata_round_trips_through_parquet(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [3])
    kv = pq.ParquetFile(next((out / "data").glob("*.parquet"))).schema_arrow.metadata
    assert kv[b"flextok.codebook_size"] == b"64000"
    assert CorpusMeta.from_kv(kv).num_tokens == 8


def test_metadata_without_flextok_keys_is_rejected():
    with pytest.raises(ValueError, match="flextok.tokenizer"):
        CorpusMeta.from_kv({b"pandas": b"{}"})


# ------------------------------------------------------------------------------------------ Ray Dataset
def test_read_corpus_truncates_to_k(ray_session, tmp_path: Path):
    out, units = numbered_corpus(tmp_path / "out", [6, 4])
    rows = read_corpus(str(out), k=3).take_all()
    tokens = {key: t for keys, _, ts in units.values() for key, t in zip(keys, ts, strict=True)}
    assert len(rows) == 10
    assert all(r["tokens"] == tokens[r["key"]][:3].tolist() and r["num_tokens"] == 3 for r in rows)
    assert read_corpus(str(out)).take(1)[0]["num_tokens"] == 8


def test_read_corpus_rejects_k_beyond_the_stored_tokens(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [2])
    with pytest.raises(ValueError, match="1 <= k <= 8"):
        read_corpus(str(out), k=9)


# ------------------------------------------------------------------------------------------ IterableDataset
def first_tokens(ds) -> list[int]:
    return [int(tokens[0]) for tokens, _ in ds]


def test_corpus_dataset_yields_truncated_long_tokens_and_labels(tmp_path: Path):
    out, units = numbered_corpus(tmp_path / "out", [5])
    keys, labels, tokens = units["u0"]
    got = list(CorpusDataset(str(out), k=4))
    assert len(got) == 5
    for (t, label), want_tokens, want_label in zip(got, tokens, labels, strict=True):
        assert t.dtype == torch.long and t.tolist() == want_tokens[:4].tolist()
        assert label == (-1 if want_label is None else want_label)


def test_uneven_slices_cover_every_row_once_across_ranks(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [7, 5, 11])
    seen = []
    for rank in range(3):
        seen += first_tokens(CorpusDataset(str(out), rank=rank, world_size=3, even=False, shuffle=True, seed=1))
    assert sorted(seen) == list(range(23))


def test_even_slices_give_every_rank_the_same_count(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [7, 5, 11])
    per_rank = [first_tokens(CorpusDataset(str(out), rank=r, world_size=4)) for r in range(4)]
    assert [len(p) for p in per_rank] == [6, 6, 6, 6]  # ceil(23 / 4), padded by wrapping around
    assert set().union(*per_rank) == set(range(23))
    assert CorpusDataset(str(out), rank=0, world_size=4).rows_per_rank() == 6


def test_dataloader_workers_split_a_rank(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [9, 9])
    seen = []
    for rank in range(2):
        ds = CorpusDataset(str(out), rank=rank, world_size=2, even=False)
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        for tokens, labels in loader:
            assert tokens.shape[1] == 8 and labels.dtype == torch.long
            seen += tokens[:, 0].tolist()
        assert ds.rows_per_rank(num_workers=2) == 9
    assert sorted(seen) == list(range(18))


def test_shuffle_is_reproducible_and_changes_with_the_epoch(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [10, 10, 10])
    ds = CorpusDataset(str(out), shuffle=True, seed=3, shuffle_buffer=8)
    epoch0 = first_tokens(ds)
    assert first_tokens(ds) == epoch0
    ds.set_epoch(1)
    epoch1 = first_tokens(ds)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0) == list(range(30))
    assert first_tokens(CorpusDataset(str(out))) == list(range(30))  # no shuffle: file order


# ------------------------------------------------------------------------------------------ validation
def test_validation_finds_duplicate_keys(tmp_path: Path):
    tokens = np.zeros((3, 8), np.int64)
    units = {"a": (["x", "y", "z"], [1, 2, 3], tokens), "b": (["z"], [3], tokens[:1])}
    out = make_corpus(tmp_path / "out", units, meta_with(num_tokens=8))
    problems = validate_corpus(str(out)).problems
    assert len(problems) == 1 and "1 duplicate (key, aug) rows" in problems[0] and "'z'" in problems[0]


def test_validation_finds_tokens_outside_the_codebook(tmp_path: Path):
    tokens = np.array([[1, 2, 3, 1000]])
    out = make_corpus(tmp_path / "out", {"a": (["x"], [0], tokens)}, meta_with(num_tokens=4, codebook_size=1000))
    assert any("token id 1000 >= codebook size 1000" in p for p in validate_corpus(str(out)).problems)


def test_validation_finds_count_mismatches_and_stray_files(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [4, 4])
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["shards"][0]["written"] = 5
    (out / "_manifest.json").write_text(json.dumps(manifest))
    (out / "data" / "stray-0000.parquet").write_bytes(b"")
    problems = validate_corpus(str(out)).problems
    assert any("manifest says 5 rows written, files hold 4" in p for p in problems)
    assert any("stray-0000.parquet: data file not in the manifest" in p for p in problems)


def test_validation_of_an_unfinished_output(tmp_path: Path):
    out, _ = numbered_corpus(tmp_path / "out", [2])
    (out / "_manifest.json").unlink()
    assert "has not finished" in validate_corpus(str(out)).problems[0]
