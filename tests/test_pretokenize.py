"""The pretokenize job on Ray Data: tokens equal model.tokenize, the output contract, exactly-once across
reruns, crashes and worker death, and bad inputs recorded while the rest completes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards import copy_subset, png_header_only, sample_files, sample_labels, tar_of_samples, write_tar

from flextok.checkpoint import weights_digest
from jobs import pretokenize as pretokenize_job
from jobs import validate_corpus as validate_job
from pipeline.data.corpus import ERRORS_SCHEMA, SCHEMA, CorpusMeta, validate_corpus
from pipeline.data.preprocess import PREPROCESSING, center_crop_adm, decode_image, to_model_input
from pipeline.data.pretokenize import (
    JobInputError,
    PretokenizeConfig,
    TokenizeActor,
    check_output,
    run_pretokenize,
    unit_name,
)
from pipeline.data.sources import expand_inputs

META = CorpusMeta("tiny", "0" * 64, 64000, 32, 32, 32, "none", PREPROCESSING)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-flextok")
    tiny_model.save_pretrained(folder)
    return folder


def config(model_dir: Path, inputs: list[Path | str], output: Path, **kw) -> PretokenizeConfig:
    kw.setdefault("batch_size", 16)
    return PretokenizeConfig(model=str(model_dir), inputs=[str(i) for i in inputs], output=str(output), **kw)


def rows_of(output: Path) -> list[dict]:
    return pq.read_table(output / "data", schema=SCHEMA).to_pylist()


def reference_tokens(model, files: list[Path], flip: bool = False) -> dict[str, list[int]]:
    """What model.tokenize gives on the same preprocessed images, in one plain batch."""
    crops = np.stack([center_crop_adm(decode_image(f.read_bytes()), 32) for f in files])  # [N, 32, 32, 3]
    if flip:
        crops = crops[:, :, ::-1]
    tokens = model.tokenize(to_model_input(crops))
    return {f.stem: t.tolist() for f, t in zip(files, tokens, strict=True)}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """path -> (inode, mtime_ns) of every file: equal snapshots mean nothing was rewritten."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def tar_shards(imagenet_sample: Path, folder: Path, n_shards: int, per_shard: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = sample_files(imagenet_sample, n_shards * per_shard)
    return [
        tar_of_samples(imagenet_sample, folder / f"s-{i:03d}.tar", files[i * per_shard : (i + 1) * per_shard])
        for i in range(n_shards)
    ]


# ------------------------------------------------------------------------------------------ the full sample
@pytest.fixture(scope="module")
def sample_corpus(ray_session, model_dir, imagenet_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "out"
    summary = run_pretokenize(config(model_dir, [imagenet_sample], out, folder_chunk=100, batch_size=32))
    return out, summary


def test_tokens_equal_model_tokenize_on_the_same_images(sample_corpus, tiny_model, imagenet_sample):
    out, summary = sample_corpus
    assert summary.committed == 3 and summary.rows == 250 and summary.failed == 0
    rows = rows_of(out)
    expected = reference_tokens(tiny_model, sample_files(imagenet_sample))
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert all(r["tokens"] == expected[r["key"]] for r in rows)
    labels = sample_labels(imagenet_sample)
    assert all(r["label"] == labels[r["key"] + ".JPEG"] for r in rows)
    assert {(r["num_tokens"], r["aug"], r["source"]) for r in rows} == {(32, 0, str(imagenet_sample))}


def test_output_schema_metadata_manifest_and_errors_file(sample_corpus, tiny_model, model_dir):
    out, _ = sample_corpus
    files = sorted((out / "data").glob("*.parquet"))
    assert len(files) == 3
    for f in files:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.remove_metadata() == SCHEMA
        meta = CorpusMeta.from_kv(pf.schema_arrow.metadata)
        assert meta == CorpusMeta(
            tokenizer=model_dir.name,
            tokenizer_sha256=weights_digest(tiny_model.state_dict()),
            codebook_size=64000,
            num_registers=32,
            num_tokens=32,
            resolution=32,
            augment="none",
            preprocessing=PREPROCESSING,
        )
        column = pf.metadata.row_group(0).column(pf.schema_arrow.get_field_index("tokens"))
        assert column.compression == "ZSTD" and "BYTE_STREAM_SPLIT" in column.encodings
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["totals"] == {"shards": 3, "read": 250, "written": 250, "failed": 0, "files": 3}
    assert sorted(f for s in manifest["shards"] for f in s["files"]) == [f"data/{f.name}" for f in files]
    errors = pq.read_table(out / "_errors.parquet")
    assert errors.num_rows == 0 and errors.schema.remove_metadata() == ERRORS_SCHEMA
    assert validate_corpus(str(out)).problems == []


def test_rerun_over_a_finished_output_writes_nothing(sample_corpus, model_dir, imagenet_sample):
    out, _ = sample_corpus
    before = snapshot(out)
    summary = run_pretokenize(config(model_dir, [imagenet_sample], out, folder_chunk=100))
    assert (summary.committed, summary.skipped) == (0, 3)
    assert snapshot(out) == before


def test_rerun_with_other_settings_is_refused(sample_corpus, model_dir, imagenet_sample):
    out, _ = sample_corpus
    with pytest.raises(JobInputError, match="num_tokens"):
        run_pretokenize(config(model_dir, [imagenet_sample], out, folder_chunk=100, num_tokens=8))


def test_rerun_after_the_folder_changed_is_refused(imagenet_sample, tmp_path):
    folder = copy_subset(imagenet_sample, tmp_path / "imgs", 4)
    (before,) = expand_inputs([str(folder)])
    marker = {"digest": before.digest, "metadata": META.to_kv()}
    check_output({unit_name(before): marker}, {unit_name(before): before}, META, "out")  # unchanged: fine
    (folder / sample_files(imagenet_sample, 1)[0].name).unlink()
    (after,) = expand_inputs([str(folder)])
    assert unit_name(after) == unit_name(before)
    with pytest.raises(JobInputError, match="changed"):
        check_output({unit_name(before): marker}, {unit_name(after): after}, META, "out")


def test_rerun_after_the_labels_changed_is_refused(imagenet_sample, tmp_path):
    folder = copy_subset(imagenet_sample, tmp_path / "imgs", 4)
    (before,) = expand_inputs([str(folder)])
    marker = {"digest": before.digest, "metadata": META.to_kv()}
    csv = folder / "labels.csv"
    csv.write_text(csv.read_text().replace(",0\n", ",1\n"))  # the tench becomes class 1
    (after,) = expand_inputs([str(folder)])
    assert after.files == before.files and after.labels != before.labels
    with pytest.raises(JobInputError, match="labels changed"):
        check_output({unit_name(before): marker}, {unit_name(after): after}, META, "out")


# ------------------------------------------------------------------------------------------ options
def test_num_tokens_stores_the_prefix(ray_session, model_dir, tiny_model, imagenet_sample, tmp_path):
    (tar,) = tar_shards(imagenet_sample, tmp_path / "in", 1, 6)
    out = tmp_path / "out"
    run_pretokenize(config(model_dir, [tar], out, num_tokens=8))
    expected = reference_tokens(tiny_model, sample_files(imagenet_sample, 6))
    rows = rows_of(out)
    assert len(rows) == 6
    assert all(r["tokens"] == expected[r["key"]][:8] and r["num_tokens"] == 8 for r in rows)


def test_flip_augment_writes_both_copies(ray_session, model_dir, tiny_model, imagenet_sample, tmp_path):
    (tar,) = tar_shards(imagenet_sample, tmp_path / "in", 1, 5)
    out = tmp_path / "out"
    run_pretokenize(config(model_dir, [tar], out, augment="flip"))
    files = sample_files(imagenet_sample, 5)
    plain, flipped = reference_tokens(tiny_model, files), reference_tokens(tiny_model, files, flip=True)
    rows = rows_of(out)
    assert sorted((r["key"], r["aug"]) for r in rows) == sorted((f.stem, a) for f in files for a in (0, 1))
    assert all(r["tokens"] == (flipped if r["aug"] else plain)[r["key"]] for r in rows)
    assert validate_corpus(str(out)).problems == []


def test_parquet_and_folder_inputs_in_one_job(ray_session, model_dir, tiny_model, imagenet_sample, tmp_path):
    files = sample_files(imagenet_sample, 8)
    pq.write_table(
        pa.table({"key": [f.stem for f in files[:4]], "image": [f.read_bytes() for f in files[:4]]}),
        tmp_path / "p.parquet",
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in files[4:]:
        (folder / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    run_pretokenize(config(model_dir, [tmp_path / "p.parquet", folder], out))
    expected = reference_tokens(tiny_model, files)
    rows = rows_of(out)
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert all(r["tokens"] == expected[r["key"]] and r["label"] is None for r in rows)
    assert {r["source"] for r in rows} == {str(tmp_path / "p.parquet"), str(folder)}


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_are_recorded_and_the_rest_completes(ray_session, model_dir, imagenet_sample, tmp_path):
    inputs = tmp_path / "in"
    tar_shards(imagenet_sample, inputs, 1, 4)  # a good shard of 4
    files = sample_files(imagenet_sample, 10)
    full = tar_of_samples(imagenet_sample, tmp_path / "full.tar", files[4:10]).read_bytes()
    (inputs / "truncated.tar").write_bytes(full[: len(full) // 2])
    jpg = files[0].read_bytes()
    write_tar(
        inputs / "hostile.tar",
        [
            ("../x.jpg", jpg),
            ("corrupt.jpg", jpg[: len(jpg) // 3]),
            ("empty.jpg", b""),
            ("bomb.png", png_header_only(20_000, 20_000)),
            ("fine.jpg", jpg),
        ],
    )
    out = tmp_path / "out"
    outside_before = {p for p in tmp_path.rglob("*") if out not in p.parents}
    summary = run_pretokenize(config(model_dir, [inputs / "*.tar"], out))

    errors = pq.read_table(out / "_errors.parquet").to_pylist()
    by_key = {e["key"]: e for e in errors}
    assert by_key["../x.jpg"]["error_class"] == "UnsafePath"
    assert by_key["corrupt"]["error_class"] == "ImageDecodeError"
    assert by_key["empty"]["error_class"] == "ImageDecodeError" and "empty" in by_key["empty"]["message"]
    assert by_key["bomb"]["error_class"] == "ImageTooLargeError"
    truncated = [e for e in errors if e["source"] == str(inputs / "truncated.tar")]
    assert [e["error_class"] for e in truncated] == ["CorruptShard"]
    rows = rows_of(out)
    keys = sorted(r["key"] for r in rows)
    survivors = [f.stem for f in files[4:10]][: len(keys) - 5]  # the truncated shard's readable samples
    assert keys == sorted([f.stem for f in files[:4]] + ["fine"] + survivors)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["totals"]["failed"] == len(errors) == summary.failed == 5
    assert manifest["totals"]["read"] == len(rows) + len(errors)
    assert {p for p in tmp_path.rglob("*") if out not in p.parents and p != out} == outside_before
    assert validate_corpus(str(out)).problems == []


# ------------------------------------------------------------------------------------------ exactly once
class SimulatedCrashError(RuntimeError):
    pass


def test_rerun_after_a_crash_completes_only_what_is_missing(ray_session, model_dir, imagenet_sample, tmp_path):
    tars = tar_shards(imagenet_sample, tmp_path / "in", 5, 4)
    out = tmp_path / "out"
    committed: list[str] = []

    def crash_after_two(unit: str, marker: dict) -> None:
        committed.append(unit)
        if len(committed) == 2:
            raise SimulatedCrashError("driver dies after two commits")

    with pytest.raises(SimulatedCrashError):
        run_pretokenize(config(model_dir, tars, out, batch_size=4), on_commit=crash_after_two)
    assert not (out / "_manifest.json").exists()
    first = {k: v for k, v in snapshot(out).items() if k.startswith("data/")}
    assert len(first) == 2

    summary = run_pretokenize(config(model_dir, tars, out, batch_size=4))
    assert (summary.skipped, summary.committed, summary.rows) == (2, 3, 12)
    after = snapshot(out)
    assert all(after[k] == v for k, v in first.items())  # committed shards were not rewritten
    keys = [r["key"] for r in rows_of(out)]
    assert len(keys) == len(set(keys)) == 20
    assert validate_corpus(str(out)).problems == []


def test_leftovers_between_rename_and_marker_are_replaced(ray_session, model_dir, imagenet_sample, tmp_path):
    tars = tar_shards(imagenet_sample, tmp_path / "in", 2, 3)
    out = tmp_path / "out"
    run_pretokenize(config(model_dir, tars, out))
    # A crash after a unit's files were renamed into data/ but before its marker: drop the marker (and the
    # manifest, which a running job has removed), double that unit's rows, leave a half-written temp file.
    marker = sorted((out / "_units").glob("*.json"))[0]
    files = json.loads(marker.read_text())["files"]
    marker.unlink()
    (out / "_manifest.json").unlink()
    data = out / files[0]
    table = pq.read_table(data)
    pq.write_table(pa.concat_tables([table, table]), data)
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / Path(files[0]).name).write_bytes(b"half a file")

    summary = run_pretokenize(config(model_dir, tars, out))
    assert (summary.skipped, summary.committed) == (1, 1)
    keys = [r["key"] for r in rows_of(out)]
    assert len(keys) == len(set(keys)) == 6
    assert not list((out / "_tmp").glob("*"))
    assert validate_corpus(str(out)).problems == []


class CrashOnceActor(TokenizeActor):
    """Dies (the whole worker process) on its first batch, once per job: a marker file says it happened."""

    crash_marker: str = ""

    def __call__(self, batch):
        try:
            fd = os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().__call__(batch)
        os.close(fd)
        os._exit(1)


def test_an_actor_dying_mid_job_costs_retries_not_rows(ray_session, model_dir, imagenet_sample, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    tars = tar_shards(imagenet_sample, tmp_path / "in", 3, 4)
    out = tmp_path / "out"
    actor = type("CrashOnce", (CrashOnceActor,), {"crash_marker": str(tmp_path / "crashed")})
    summary = run_pretokenize(config(model_dir, tars, out, batch_size=4), actor_cls=actor)
    assert (tmp_path / "crashed").exists()  # an actor really died
    assert summary.rows == 12
    keys = [r["key"] for r in rows_of(out)]
    assert sorted(keys) == sorted(f.stem for f in sample_files(imagenet_sample, 12))
    assert validate_corpus(str(out)).problems == []


# ------------------------------------------------------------------------------------------ command line
def test_job_command_line_and_validation(ray_session, model_dir, imagenet_sample, tmp_path, capsys):
    tars = tar_shards(imagenet_sample, tmp_path / "in", 2, 3)
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--input", str(tars[0]), "--input", str(tars[1]), "--output", str(out)]
    assert pretokenize_job.main(argv + ["--batch-size", "4"]) == 0
    assert validate_job.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rows 6" in printed and printed.rstrip().endswith("OK")
    next((out / "data").glob("*.parquet")).unlink()
    assert validate_job.main(["--corpus", str(out)]) == 1
    assert "missing" in capsys.readouterr().out


def test_config_inputs_are_replaced_by_command_line_inputs(tmp_path):
    from jobs.common import parse_args

    (tmp_path / "c.yaml").write_text("input: [a.tar, b.tar]\nbatch-size: 8\n")
    parser = pretokenize_job.build_parser()
    args = parse_args(parser, ["--config", str(tmp_path / "c.yaml")])
    assert args.input == ["a.tar", "b.tar"] and args.batch_size == 8
    args = parse_args(pretokenize_job.build_parser(), ["--config", str(tmp_path / "c.yaml"), "--input", "c.tar"])
    assert args.input == ["c.tar"]


def test_missing_required_options_are_one_line_errors(capsys):
    from jobs.common import run_main

    assert run_main(pretokenize_job.main, ["--model", "m"]) == 2
    assert capsys.readouterr().err.strip() == "error: --input is required"


def test_actor_tokenizes_image_rows_and_passes_other_rows_through(tiny_model, imagenet_sample):
    """The actor's batch function alone: image rows -> tokens, error/trailer rows pass through as null."""
    actor = TokenizeActor.__new__(TokenizeActor)
    actor.model, actor.resolution, actor.num_tokens = tiny_model, 32, 32
    from pipeline.data.pretokenize import IMAGES_SCHEMA

    files = sample_files(imagenet_sample, 3)
    crops = [center_crop_adm(decode_image(f.read_bytes()), 32) for f in files]
    rows = [
        {"unit": "u", "record": i, "key": f.stem, "source": "s", "aug": 0, "image": c.tobytes()}
        for i, (f, c) in enumerate(zip(files, crops, strict=True))
    ]
    rows.insert(1, {"unit": "u", "record": 9, "key": "bad", "source": "s", "aug": 0, "error": "x", "error_class": "E"})
    out = actor(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)).to_pylist()
    expected = tiny_model.tokenize(to_model_input(np.stack(crops)))
    assert out[1]["tokens"] is None and out[1]["error"] == "x"
    assert [out[i]["tokens"] for i in (0, 2, 3)] == expected.tolist()
