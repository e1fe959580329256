"""Sources: folder / webdataset / Parquet inputs -> records, URL expansion, bad records, image_dataset."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards import copy_subset, sample_files, sample_labels, tar_of_samples, write_tar

from jobs import make_shards
from pipeline.data.preprocess import center_crop_adm, decode_image
from pipeline.data.sources import (
    BAD_KEY,
    BAD_LABEL,
    CORRUPT_SHARD,
    DUPLICATE_KEY,
    NO_IMAGE,
    NOT_A_FILE,
    TOO_LARGE,
    UNSAFE_PATH,
    InputError,
    expand_inputs,
    image_dataset,
    iter_records,
    read_labels_csv,
)


def records(urls: list[str]) -> list:
    return [r for shard in expand_inputs(urls) for r in iter_records(shard)]


# ------------------------------------------------------------------------------------------ folder
def test_folder_records_have_relative_keys_labels_and_bytes(imagenet_sample: Path):
    recs = records([str(imagenet_sample)])
    labels = sample_labels(imagenet_sample)
    assert len(recs) == 250 == len(labels)
    assert all(r.error is None for r in recs)
    by_key = {r.key: r for r in recs}
    assert by_key["n01440764_tench"].label == labels["n01440764_tench.JPEG"] == 0
    assert by_key["n01440764_tench"].data == (imagenet_sample / "n01440764_tench.JPEG").read_bytes()
    assert {r.source for r in recs} == {str(imagenet_sample)}


def test_folder_is_cut_into_chunks_in_sorted_order(imagenet_sample: Path):
    shards = expand_inputs([str(imagenet_sample)], folder_chunk=100)
    assert [len(s.files) for s in shards] == [100, 100, 50]
    assert [s.index for s in shards] == [0, 1, 2]
    assert len({s.id for s in shards}) == 3
    keys = [r.key for s in shards for r in iter_records(s)]
    assert keys == sorted(keys)


def test_folder_keys_keep_subfolders_and_skip_non_images(tmp_path: Path, imagenet_sample: Path):
    src = sample_files(imagenet_sample, 2)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "one.jpg").write_bytes(src[0].read_bytes())
    (tmp_path / "two.PNG").write_bytes(src[1].read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "three.jpg").write_bytes(src[0].read_bytes())
    assert sorted(r.key for r in records([str(tmp_path)])) == ["a/b/one", "two"]


def test_folder_labels_from_an_explicit_csv_missing_rows_are_none(tmp_path: Path, imagenet_sample: Path):
    folder = copy_subset(imagenet_sample, tmp_path / "imgs", 3, with_labels=False)
    files = sample_files(imagenet_sample, 3)
    (tmp_path / "labels.csv").write_text(f"file,label\n{files[0].stem},7\n{files[1].name},9\n")
    shards = expand_inputs([str(folder)], labels=str(tmp_path / "labels.csv"))
    assert [r.label for r in iter_records(shards[0])] == [7, 9, None]


@pytest.mark.parametrize(
    "text, message",
    [("file,class\na.jpg,1\n", "needs columns"), ("file,class_index\na.jpg,cat\n", "line 2")],
)
def test_bad_labels_csv_is_an_input_error(tmp_path: Path, text: str, message: str):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_labels_csv(str(tmp_path / "labels.csv"))


# ------------------------------------------------------------------------------------------ webdataset
def test_make_shards_round_trip_matches_the_folder(tmp_path: Path, imagenet_sample: Path):
    rc = make_shards.main(
        ["--input", str(imagenet_sample), "--output", str(tmp_path / "shards"), "--shard-size", "100"]
    )
    assert rc == 0
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    from_tars = records([str(tmp_path / "shards" / "shard-*.tar")])
    from_folder = records([str(imagenet_sample)])
    assert [(r.key, r.label, r.data) for r in from_tars] == [(r.key, r.label, r.data) for r in from_folder]
    assert {r.source for r in from_tars} == {str(t) for t in tars}


def test_make_shards_is_reproducible(tmp_path: Path, imagenet_sample: Path):
    folder = copy_subset(imagenet_sample, tmp_path / "imgs", 5)
    for out in ("a", "b"):
        assert make_shards.main(["--input", str(folder), "--output", str(tmp_path / out)]) == 0
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()


def test_tar_samples_group_by_key_and_read_cls(tmp_path: Path, imagenet_sample: Path):
    files = sample_files(imagenet_sample, 2)
    tar = write_tar(
        tmp_path / "s.tar",
        [
            ("dir/x.png", files[0].read_bytes()),
            ("dir/x.cls", b" 12\n"),
            ("dir/x.json", b"{}"),
            ("y.webp", files[1].read_bytes()),
            ("README", b"no extension: not part of a sample"),
        ],
    )
    recs = records([str(tar)])
    assert [(r.key, r.label, r.error) for r in recs] == [("dir/x", 12, None), ("y", None, None)]
    assert recs[0].data == files[0].read_bytes()


def test_gzipped_tar_is_read(tmp_path: Path, imagenet_sample: Path):
    tar = tar_of_samples(imagenet_sample, tmp_path / "s.tar", sample_files(imagenet_sample, 3))
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    assert [r.key for r in records([str(tmp_path / "s.tar.gz")])] == [f.stem for f in sample_files(imagenet_sample, 3)]


def test_tar_bad_members_become_error_records(tmp_path: Path, imagenet_sample: Path):
    jpg = sample_files(imagenet_sample, 1)[0].read_bytes()
    tar = write_tar(
        tmp_path / "bad.tar",
        [
            ("../x.jpg", jpg),
            ("/etc/y.jpg", jpg),
            ("a.cls", b"3"),  # a sample without an image
            ("b.jpg", jpg),
            ("b.cls", b"three"),
            ("c.jpg", jpg),
            ("d.jpg", jpg),
            ("c.jpg", jpg),  # key c again, after another sample
            ("e.jpg", jpg),
            ("e.cls", b"99999999999"),  # beyond int32
        ],
    )
    recs = records([str(tar)])
    got = [(r.key, r.error_class) for r in recs]
    assert got == [
        ("../x.jpg", UNSAFE_PATH),
        ("/etc/y.jpg", UNSAFE_PATH),
        ("a", NO_IMAGE),
        ("b", BAD_LABEL),
        ("c", None),
        ("d", None),
        ("c", DUPLICATE_KEY),
        ("e", BAD_LABEL),
    ]
    assert all(r.data is None and r.error for r in recs if r.error_class)
    assert not (tmp_path.parent / "x.jpg").exists()


def test_tar_member_above_the_size_cap_is_an_error_record_and_not_read(tmp_path, imagenet_sample, monkeypatch):
    import pipeline.data.sources

    jpg = sample_files(imagenet_sample, 1)[0].read_bytes()
    monkeypatch.setattr(pipeline.data.sources, "MAX_MEMBER_BYTES", len(jpg))
    tar = write_tar(tmp_path / "big.tar", [("a.jpg", jpg), ("big.jpg", jpg + b"x"), ("big.cls", b"1"), ("c.jpg", jpg)])
    recs = records([str(tar)])
    assert [(r.key, r.error_class) for r in recs] == [("a", None), ("big", TOO_LARGE), ("c", None)]
    assert f"has {len(jpg) + 1} bytes (limit {len(jpg)})" in recs[1].error and recs[2].data == jpg


def test_tar_member_names_that_are_not_utf8_are_error_records(tmp_path: Path, imagenet_sample: Path):
    import tarfile

    jpg = sample_files(imagenet_sample, 1)[0].read_bytes()
    tar = write_tar(tmp_path / "latin1.tar", [("caf\udce9.jpg", jpg), ("ok.jpg", jpg)], format=tarfile.GNU_FORMAT)
    recs = records([str(tar)])
    assert [(r.key, r.error_class) for r in recs] == [("caf\ufffd", BAD_KEY), ("ok", None)]


def test_tar_links_are_error_records(tmp_path: Path, imagenet_sample: Path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "links.tar", "w") as tar:
        info = tarfile.TarInfo("evil.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
        data = sample_files(imagenet_sample, 1)[0].read_bytes()
        ok = tarfile.TarInfo("fine.jpg")
        ok.size = len(data)
        tar.addfile(ok, io.BytesIO(data))
    assert [(r.key, r.error_class) for r in records([str(tmp_path / "links.tar")])] == [
        ("evil.jpg", NOT_A_FILE),
        ("fine", None),
    ]


def test_truncated_tar_yields_readable_records_then_one_error(tmp_path: Path, imagenet_sample: Path):
    files = sample_files(imagenet_sample, 6)
    full = tar_of_samples(imagenet_sample, tmp_path / "full.tar", files).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: int(len(full) * 0.6)])
    recs = records([str(cut)])
    good = [r for r in recs if r.error is None]
    assert 1 <= len(good) < 6
    assert [r.key for r in good] == [f.stem for f in files[: len(good)]]
    assert recs[-1].error_class == CORRUPT_SHARD and "unexpected end" in recs[-1].error.lower()
    assert len(recs) == len(good) + 1


def test_garbage_tar_is_one_error_record(tmp_path: Path):
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 1000)
    recs = records([str(tmp_path / "junk.tar")])
    assert len(recs) == 1 and recs[0].error_class == CORRUPT_SHARD


# ------------------------------------------------------------------------------------------ parquet
def test_parquet_with_hugging_face_image_structs(tmp_path: Path, imagenet_sample: Path):
    files = sample_files(imagenet_sample, 3)
    image = pa.array(
        [{"bytes": f.read_bytes(), "path": f.name} for f in files] + [{"bytes": None, "path": "gone.jpg"}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": image, "label": [1, 2, None, 4]}), tmp_path / "hf.parquet")
    recs = records([str(tmp_path / "hf.parquet")])
    assert [(r.key, r.label, r.error_class) for r in recs] == [
        ("000000000", 1, None),
        ("000000001", 2, None),
        ("000000002", None, None),
        ("000000003", 4, NO_IMAGE),
    ]
    assert recs[1].data == files[1].read_bytes()


def test_parquet_with_binary_column_and_keys(tmp_path: Path, imagenet_sample: Path):
    files = sample_files(imagenet_sample, 2)
    table = pa.table({"key": [f.stem for f in files], "jpg": [f.read_bytes() for f in files], "cls": [5, 6]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1)
    recs = records([str(tmp_path / "p.parquet")])
    assert [(r.key, r.label, r.data) for r in recs] == [
        (f.stem, c, f.read_bytes()) for f, c in zip(files, [5, 6], strict=True)
    ]


def test_parquet_without_image_column_is_one_error(tmp_path: Path):
    pq.write_table(pa.table({"caption": ["a", "b"]}), tmp_path / "text.parquet")
    recs = records([str(tmp_path / "text.parquet")])
    assert len(recs) == 1 and recs[0].error_class == NO_IMAGE and "no image column" in recs[0].error


def test_corrupt_parquet_is_one_error(tmp_path: Path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    recs = records([str(tmp_path / "bad.parquet")])
    assert len(recs) == 1 and recs[0].error_class == CORRUPT_SHARD


# ------------------------------------------------------------------------------------------ URLs
def test_globs_and_brace_ranges_expand_in_order_without_repeats(tmp_path: Path, imagenet_sample: Path):
    for i in range(3):
        tar_of_samples(imagenet_sample, tmp_path / f"s-{i:02d}.tar", sample_files(imagenet_sample, 1))
    pq.write_table(pa.table({"jpg": [b"x"]}), tmp_path / "t.parquet")
    shards = expand_inputs([str(tmp_path / "s-{00..01}.tar"), str(tmp_path / "*.tar"), str(tmp_path / "*.parquet")])
    assert [Path(s.url).name for s in shards] == ["s-00.tar", "s-01.tar", "s-02.tar", "t.parquet"]
    assert [s.kind for s in shards] == ["webdataset"] * 3 + ["parquet"]


@pytest.mark.parametrize("name, message", [("nothing-*.tar", "no files match"), ("absent.tar", "not found")])
def test_unmatched_inputs_are_errors(tmp_path: Path, name: str, message: str):
    with pytest.raises(InputError, match=message):
        expand_inputs([str(tmp_path / name)])


def test_unknown_file_kind_is_an_error(tmp_path: Path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(InputError, match="not a folder"):
        expand_inputs([str(tmp_path / "data.zip")])


def test_urls_go_through_fsspec(imagenet_sample: Path):
    shards = expand_inputs([f"file://{imagenet_sample}"])
    assert shards[0].kind == "folder" and len(shards[0].files) == 250
    assert next(iter_records(shards[0])).data is not None


# ------------------------------------------------------------------------------------------ Ray Dataset
def test_image_dataset_rows_and_error_rows(ray_session, tmp_path: Path, imagenet_sample: Path):
    files = sample_files(imagenet_sample, 5)
    members = [(f"{f.stem}.jpg", f.read_bytes()) for f in files] + [("broken.jpg", b"not a jpeg")]
    tar = write_tar(tmp_path / "s.tar", members)
    rows = image_dataset([str(tar)], resolution=32).take_all()
    assert len(rows) == 6
    good = [r for r in rows if r["error"] is None]
    bad = [r for r in rows if r["error"] is not None]
    assert [r["key"] for r in good] == [f.stem for f in files]
    assert all(r["label"] == -1 and r["aug"] == 0 and r["source"] == str(tar) for r in good)
    expected = center_crop_adm(decode_image(files[0].read_bytes()), 32)
    np.testing.assert_array_equal(good[0]["image"], expected)
    assert [(r["key"], r["error_class"]) for r in bad] == [("broken", "ImageDecodeError")]
    assert bad[0]["image"].shape == (32, 32, 3)
