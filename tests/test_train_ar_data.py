"""The AR job's training dataset: a small corpus is read once (materialized), a large one streams."""

from __future__ import annotations

import numpy as np

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
