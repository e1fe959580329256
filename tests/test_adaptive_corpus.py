"""`pretokenize --adaptive`: rows of their own lengths, chosen as the library's search chooses them; metadata,
manifest, validation, readers and the AR collate on a variable-length corpus; one-line errors for bad values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shards import sample_files, tar_of_samples
from torch.utils.data import DataLoader

from jobs import pretokenize as pretokenize_job
from jobs import validate_corpus as validate_job
from jobs.common import run_main
from pipeline.data.adaptive import (
    Criterion,
    Decoding,
    PSNRScorer,
    decode_prefixes,
    image_noise,
    make_scorer,
    max_decodes,
    search_lengths,
)
from pipeline.data.adaptive_stage import image_seed
from pipeline.data.corpus import SCHEMA, CorpusDataset, CorpusMeta, pad_collate, read_corpus, validate_corpus
from pipeline.data.preprocess import PREPROCESSING, center_crop_adm, decode_image, to_model_input
from pipeline.train.ar import TokenCollate

LADDER = [1, 2, 4, 8, 16, 32]
DEC = Decoding(timesteps=2)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-flextok")
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(imagenet_sample) -> tuple[list[Path], np.ndarray]:
    files = sample_files(imagenet_sample, 6)
    return files, np.stack([center_crop_adm(decode_image(f.read_bytes()), 32) for f in files])  # [6, 32, 32, 3]


@pytest.fixture(scope="module")
def target(tiny_model, photos) -> float:
    """Between the middle two photos' PSNR at k = 32: some photos meet it, some miss."""
    files, crops = photos
    tokens = tiny_model.tokenize(to_model_input(crops))
    noise = image_noise(tiny_model, [image_seed(f.stem, 0) for f in files])
    recon = decode_prefixes(tiny_model, tokens, np.arange(6), np.full(6, 32), noise, DEC)
    return float(np.median(PSNRScorer()(crops, recon)))


@pytest.fixture(scope="module")
def corpus(ray_session, model_dir, imagenet_sample, photos, target, tmp_path_factory) -> Path:
    files, _ = photos
    folder = tmp_path_factory.mktemp("adaptive")
    tars = [tar_of_samples(imagenet_sample, folder / f"s-{i}.tar", files[3 * i : 3 * i + 3]) for i in range(2)]
    out = folder / "out"
    argv = ["--model", str(model_dir), "--output", str(out), "--batch-size", "4", "--adaptive-timesteps", "2"]
    argv += ["--input", str(tars[0]), "--input", str(tars[1]), "--adaptive", f"psnr:{target!r}"]
    assert pretokenize_job.main(argv) == 0
    return out


def rows_of(output: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(output / "data", schema=SCHEMA).to_pylist()}


def test_rows_hold_the_prefix_the_library_search_chooses(corpus, tiny_model, photos, target):
    files, crops = photos
    seeds = [image_seed(f.stem, 0) for f in files]
    tokens, want = search_lengths(tiny_model, crops, Criterion("psnr", target), LADDER, PSNRScorer(), seeds, DEC)
    rows = rows_of(corpus)
    for i, f in enumerate(files):
        k = int(want.k[i])
        assert rows[f.stem]["num_tokens"] == k
        assert rows[f.stem]["tokens"] == tokens[i, :k].tolist()
    assert len({r["num_tokens"] for r in rows.values()}) > 1  # rows of one corpus differ in length


def test_metadata_and_manifest_record_the_search(corpus, target):
    manifest = json.loads((corpus / "_manifest.json").read_text())
    meta = CorpusMeta.from_kv(manifest["metadata"])
    assert (meta.adaptive_criterion, float(meta.adaptive_target)) == ("psnr", float(f"{target:g}"))
    assert meta.ladder == LADDER and meta.num_tokens == 32
    assert meta.adaptive_decoding == "timesteps=2,guidance_scale=1"
    rows = rows_of(corpus).values()
    hist = {str(k): sum(r["num_tokens"] == k for r in rows) for k in sorted({r["num_tokens"] for r in rows})}
    assert manifest["adaptive"]["k_histogram"] == hist
    assert 0 < manifest["adaptive"]["missed"] < 6  # the target lies between the photos' PSNRs at k = 32
    assert manifest["adaptive"]["images"] == 6 and manifest["adaptive"]["decodes"] <= 6 * 3


def test_validation_accepts_the_corpus_and_catches_a_wrong_histogram(corpus, tmp_path):
    assert validate_corpus(str(corpus)).problems == []
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    manifest = json.loads((copy / "_manifest.json").read_text())
    manifest["adaptive"]["k_histogram"] = {"32": 6}
    (copy / "_manifest.json").write_text(json.dumps(manifest))
    assert any("k histogram" in p for p in validate_corpus(str(copy)).problems)


def test_readers_keep_each_rows_length_and_truncate_to_k(corpus):
    lengths = {k: r["num_tokens"] for k, r in rows_of(corpus).items()}
    rows = read_corpus(str(corpus), k=4).take_all()
    assert {r["key"]: r["num_tokens"] for r in rows} == {k: min(n, 4) for k, n in lengths.items()}
    assert all(len(r["tokens"]) == r["num_tokens"] for r in rows)
    tokens, labels, got = next(iter(DataLoader(CorpusDataset(str(corpus)), batch_size=6, collate_fn=pad_collate)))
    assert sorted(got.tolist()) == sorted(lengths.values()) and tokens.shape == (6, max(lengths.values()))
    assert all((tokens[i, n:] == 0).all() for i, n in enumerate(got.tolist()))


def test_ar_collate_pads_and_reports_lengths(corpus):
    table = pq.read_table(corpus / "data", schema=SCHEMA)
    batch = TokenCollate(null_class=1000, max_tokens=32)(table)
    assert batch["lengths"].tolist() == table.column("num_tokens").to_pylist()
    for row, n, tokens in zip(batch["tokens"], batch["lengths"], table.column("tokens").to_pylist(), strict=True):
        assert torch.equal(row[:n], torch.tensor(tokens))


def test_validate_job_prints_ok(corpus, capsys):
    assert validate_job.main([str(corpus)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adaptive", "ssim:0.9"], "expected CRITERION:TARGET"),
        (["--adaptive", "psnr:abc"], "is not a number"),
        (["--adaptive", "inception:3"], "[0, 2]"),
        (["--adaptive", "psnr:20", "--ladder", "8,4"], "strictly increasing"),
        (["--adaptive", "psnr:20", "--ladder", "1,64"], "1..32"),
        (["--adaptive", "psnr:20", "--num-tokens", "8"], "exclude each other"),
        (["--ladder", "1,2"], "--ladder needs --adaptive"),
    ],
)
def test_bad_adaptive_values_are_one_line_errors(model_dir, imagenet_sample, tmp_path, capsys, extra, message):
    argv = ["--model", str(model_dir), "--input", str(imagenet_sample), "--output", str(tmp_path / "o")] + extra
    assert run_main(pretokenize_job.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_fixed_k_metadata_has_no_adaptive_keys():
    meta = CorpusMeta("tiny", "0" * 64, 64000, 32, 32, 32, "none", PREPROCESSING)
    kv = meta.to_kv()
    assert not any("adaptive" in k for k in kv) and CorpusMeta.from_kv(kv) == meta and not meta.adaptive


def test_actor_gives_each_image_its_searched_prefix_and_passes_other_rows_through(tiny_model, photos, target):
    """The Ray Data stage's batch function alone (no cluster): one image row per photo plus an error row."""
    import pyarrow as pa

    from pipeline.data.adaptive_stage import AdaptiveTokenizeActor
    from pipeline.data.pretokenize import IMAGES_SCHEMA

    files, crops = photos
    actor = AdaptiveTokenizeActor.__new__(AdaptiveTokenizeActor)
    actor.model, actor.resolution, actor.num_tokens = tiny_model, 32, 32
    actor.criterion, actor.ladder, actor.decoding = Criterion("psnr", target), LADDER, DEC
    actor.scorer = PSNRScorer()
    rows = [
        {"unit": "u", "record": i, "key": f.stem, "source": "s", "aug": 0, "image": c.tobytes()}
        for i, (f, c) in enumerate(zip(files, crops, strict=True))
    ]
    rows.insert(2, {"unit": "u", "record": 9, "key": "bad", "source": "s", "aug": 0, "error": "x", "error_class": "E"})
    out = actor(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)).to_pylist()
    seeds = [image_seed(f.stem, 0) for f in files]
    tokens, want = search_lengths(tiny_model, crops, actor.criterion, LADDER, PSNRScorer(), seeds, DEC)
    good = [r for r in out if r["error"] is None]
    assert [len(r["tokens"]) for r in good] == want.k.tolist()
    assert [r["tokens"] for r in good] == [tokens[i, :k].tolist() for i, k in enumerate(want.k)]
    assert [r["adaptive_missed"] for r in good] == want.missed.tolist()
    assert [r["adaptive_decodes"] for r in good] == want.decodes.tolist()
    assert out[2]["tokens"] is None and out[2]["adaptive_missed"] is None and out[2]["error"] == "x"
    assert len(set(want.k.tolist())) > 1 and 0 < want.missed.sum() < len(files)


def test_actor_with_a_slope_target_runs_the_slope_search(tiny_model, photos):
    """psnr-slope:LAMBDA needs no length predictor: the stage runs the gain search, and nothing is missed."""
    import pyarrow as pa

    from pipeline.data.adaptive_stage import AdaptiveTokenizeActor
    from pipeline.data.pretokenize import IMAGES_SCHEMA

    files, crops = photos
    actor = AdaptiveTokenizeActor.__new__(AdaptiveTokenizeActor)
    actor.model, actor.resolution, actor.num_tokens = tiny_model, 32, 32
    actor.criterion, actor.ladder, actor.decoding = Criterion("psnr-slope", 0.05), LADDER, DEC
    actor.scorer = make_scorer(actor.criterion)
    rows = [
        {"unit": "u", "record": i, "key": f.stem, "source": "s", "aug": 0, "image": c.tobytes()}
        for i, (f, c) in enumerate(zip(files, crops, strict=True))
    ]
    out = actor(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)).to_pylist()
    seeds = [image_seed(f.stem, 0) for f in files]
    _, want = search_lengths(tiny_model, crops, actor.criterion, LADDER, PSNRScorer(), seeds, DEC)
    assert [len(r["tokens"]) for r in out] == want.k.tolist()
    assert not any(r["adaptive_missed"] for r in out)
    assert max(r["adaptive_decodes"] for r in out) <= max_decodes(len(LADDER), actor.criterion) == 4


def test_a_written_variable_length_corpus_validates_and_reads_back_without_ray(tmp_path):
    """The writer, manifest, validation and CorpusDataset on rows of lengths 1, 4 and 32 (no cluster needed)."""
    import pyarrow as pa

    from pipeline.data.corpus import adaptive_stats, commit_unit, output_fs, write_summary

    meta = CorpusMeta(
        "tiny", "0" * 64, 64000, 32, 32, 32, "none", PREPROCESSING, adaptive_criterion="psnr", adaptive_target="20",
        adaptive_ladder="1,2,4,8,16,32", adaptive_decoding="timesteps=2,guidance_scale=1",
    )  # fmt: skip
    lengths = [1, 4, 32, 4]
    rows = [list(range(n)) for n in lengths]
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(4)],
            "label": [0, 1, None, 3],
            "tokens": pa.array(rows, pa.list_(pa.field("element", pa.uint16()))),
            "num_tokens": pa.array(lengths, pa.int16()),
            "source": ["s"] * 4,
            "aug": pa.array([0] * 4, pa.int16()),
        }
    )
    fs, root = output_fs(str(tmp_path / "c"))
    marker = {"url": "s", "kind": "folder", "index": 0, "digest": "d", "read": 4, "failed": 0, "errors": []}
    marker["adaptive"] = adaptive_stats(np.array(lengths), np.array([False, False, True, False]), np.full(4, 3))
    markers = {"u": commit_unit(fs, root, "u", table, meta, 100, marker)}
    manifest = write_summary(fs, root, markers, meta)
    assert manifest["adaptive"]["k_histogram"] == {"1": 1, "4": 2, "32": 1} and manifest["adaptive"]["missed"] == 1
    assert validate_corpus(str(tmp_path / "c")).problems == []
    loader = DataLoader(CorpusDataset(str(tmp_path / "c"), k=8), batch_size=4, collate_fn=pad_collate)
    tokens, labels, got = next(iter(loader))
    assert got.tolist() == [1, 4, 8, 4] and tokens.shape == (4, 8) and labels.tolist() == [0, 1, -1, 3]
    assert tokens[0].tolist() == [0] + [0] * 7 and tokens[2].tolist() == list(range(8))
