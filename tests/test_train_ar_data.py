"""The AR job's training data: a small corpus is read once (materialized), a large one streams; rows of different
lengths (adaptive corpora) are padded, the padding is measured, and they turn the end-of-sequence token on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flextok.ar import ar_preset
from pipeline.data.corpus import CorpusMeta, commit_unit, output_fs, tokens_table, write_summary


def write_corpus(folder, rows: int = 40, k: int = 8) -> None:
    tokens = np.arange(rows * k).reshape(rows, k) % 64000
    meta = CorpusMeta("test", "0" * 64, 64000, k, k, 32, "none", "synthetic")
    table = tokens_table([f"{i:04d}" for i in range(rows)], list(range(rows)), tokens, ["t"] * rows, [0] * rows)
    fs, root = output_fs(str(folder))
    marker = {"url": "t", "kind": "folder", "index": 0, "read": rows, "failed": 0, "errors": []}
    write_summary(fs, root, {"t": commit_unit(fs, root, "t", table, meta, rows, marker)}, meta)


def test_a_small_corpus_is_materialized_once_and_a_large_one_streams(ray_session, tmp_path):
    from ray.data.dataset import MaterializedDataset

    from pipeline.train.ar import corpus_for_training

    write_corpus(tmp_path)
    small = corpus_for_training(str(tmp_path), k=4)  # 40 rows: far below the default threshold
    large = corpus_for_training(str(tmp_path), k=4, materialize_bytes=100)  # "large": over 100 bytes
    assert isinstance(small, MaterializedDataset)
    assert not isinstance(large, MaterializedDataset)
    rows = [sorted((r["key"], list(r["tokens"])) for r in ds.take_all()) for ds in (small, large)]
    assert rows[0] == rows[1] and len(rows[0]) == 40 and len(rows[0][0][1]) == 4


def variable_length_rows(lengths: list[int]) -> pa.Table:
    """Corpus rows (key, label, tokens) with token ids >= 1, so that a 0 in a batch is padding."""
    tokens = [list(range(1, n + 1)) for n in lengths]
    return pa.table({"key": [f"r{i}" for i in range(len(lengths))], "label": [1.0] * len(lengths), "tokens": tokens})


def test_rows_of_different_lengths_are_padded_and_the_padding_fraction_counts_the_padding():
    from pipeline.train.ar import ARObjective, TokenCollate, padding_fraction

    batch = TokenCollate(null_class=10, max_tokens=32)(variable_length_rows([1, 4, 2, 4, 3]))
    assert batch["tokens"].shape == (5, 4) and batch["lengths"].tolist() == [1, 4, 2, 4, 3]
    padded = (batch["tokens"] == 0).float().mean().item()
    assert padding_fraction(batch["lengths"], 4) == pytest.approx(padded)
    objective = ARObjective(ar_preset("tiny", num_classes=10, eos=True))
    assert objective(**batch)["pad_fraction"] == pytest.approx(padded)


def test_expected_padding_fraction_matches_random_batches():
    from pipeline.train.ar import expected_padding_fraction

    histogram = {1: 19, 2: 16, 4: 63, 8: 64, 16: 33, 32: 5}
    rows = np.repeat(list(histogram), list(histogram.values()))
    batches = np.random.default_rng(0).choice(rows, size=(20_000, 8))  # [batches, rows]
    simulated = 1 - batches.sum() / (batches.max(axis=1).sum() * 8)  # padded slots / all slots
    assert expected_padding_fraction(histogram, 8) == pytest.approx(simulated, abs=0.005)


@pytest.mark.parametrize(("flag", "adaptive", "expected"), [("auto", True, True), ("auto", False, False),
                                                           ("on", False, True), ("off", True, False)])  # fmt: skip
def test_eos_is_on_for_adaptive_corpora_unless_a_flag_says_otherwise(flag, adaptive, expected):
    from jobs.train_ar import use_eos

    assert use_eos(flag, adaptive) is expected
