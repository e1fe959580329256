"""The reconstruction sweep on a tiny FlexTok over real ImageNet photos: outputs, counters, determinism,
resume after a crash, cached reference statistics, a token-corpus input, and clear errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flextok.checkpoint import weights_digest
from jobs.common import JobError
from pipeline import sweep as S
from pipeline.fid import FeatureStats, Reference, save_reference
from pipeline.image_metrics import MAX_PSNR, pixel_metrics
from pipeline.report import fid_figure

N, KS = 8, "1,4,32"


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "flextok-tiny"
    tiny_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photos(imagenet_sample, tmp_path_factory) -> Path:
    """The first N photos of the shared sample (original bytes) with their labels.csv rows."""
    folder = tmp_path_factory.mktemp("photos")
    with open(imagenet_sample / "labels.csv") as f:
        rows = list(csv.DictReader(f))[:N]
    for row in rows:
        shutil.copy(imagenet_sample / row["file"], folder / row["file"])
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def sweep_argv(tiny_dir, photos, inception_weights, output, *extra) -> list[str]:
    return [
        "--model", str(tiny_dir), "--input", str(photos), "--ks", KS, "--output", str(output),
        "--timesteps", "3", "--decode-batch", "5", "--chunk-images", "3", "--grid-images", "3",
        "--batch-size", "4", "--inception-weights", str(inception_weights), *extra,
    ]  # fmt: skip


def run(capsys, argv) -> dict:
    from jobs.eval_sweep import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


@pytest.fixture(scope="module")
def first_run(ray_session, tiny_dir, photos, inception_weights, tmp_path_factory) -> Path:
    from jobs.eval_sweep import main

    output = tmp_path_factory.mktemp("sweep") / "a"
    assert main(sweep_argv(tiny_dir, photos, inception_weights, output)) == 0
    return output


def test_sweep_writes_all_outputs(first_run, tiny_model):
    for name in ("results.json", "results.md", "fid_vs_tokens.png", "recon_grid.png", "reference_stats.npz"):
        assert (first_run / name).is_file(), name
    r = results(first_run)
    assert [row["k"] for row in r["per_k"]] == [1, 4, 32]
    for row in r["per_k"]:
        assert row["num_samples"] == N
        assert row["fid"] > 0 and np.isfinite(row["fid"])
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["is_mean"] is None  # the converted weights have no classifier ...
        assert 0 < row["psnr"] < MAX_PSNR and -1 <= row["ssim"] <= 1 and row["mse"] > 0
    assert "classifier" in r["is_unavailable"]  # ... and results.json says why
    assert r["work"] == {
        "images": N,
        "bad_inputs": 0,
        "encoder_calls_per_image": 1.0,
        "real_feature_passes": 1.0,
        "decodes_per_image": 3,
    }
    p = r["provenance"]
    assert p["model"]["sha256"] == weights_digest(tiny_model.state_dict())
    assert p["seeds"]["seed"] == 0 and p["settings"]["ks"] == [1, 4, 32] and p["settings"]["timesteps"] == 3
    assert p["reference"]["computed_in_this_pass"] and p["reference"]["n"] == N
    assert p["inception"]["classifier"] is False and len(p["data"]["keys_sha256"]) == 64
    assert (first_run / "results.md").read_text().count("\n") == 2 + 3


def test_recon_grid_holds_originals_and_every_k(first_run):
    g = S.gather(S.PartialResults(first_run / "partial", {}, (S.REAL, 1, 4, 32)))
    assert len(g.grid) == 3  # --grid-images 3: the first three inputs
    assert list(g.grid) == g.keys[:3]
    for columns in g.grid.values():
        assert sorted(columns) == [S.REAL, 1, 4, 32]
    img = Image.open(first_run / "recon_grid.png")
    assert img.height > 2 * 100 and img.width > img.height  # 3 rows x 4 labelled columns


def test_fid_plot_has_labelled_log2_axis():
    fig = fid_figure([{"k": 1, "fid": 90.0}, {"k": 4, "fid": 40.0}, {"k": 256, "fid": 2.0}], "rFID", "t")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert ax.get_xlabel() == "number of tokens k" and ax.get_ylabel() == "rFID"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "256"]


def test_resume_after_a_crash_gives_the_same_numbers(
    first_run, tiny_dir, photos, inception_weights, tmp_path, capsys, monkeypatch
):
    """Crash after the first saved chunk; the rerun skips those images and ends with the first run's numbers
    (which is also 'same seed, same numbers': a separate run in another folder)."""
    from jobs.eval_sweep import main

    output = tmp_path / "b"
    argv = sweep_argv(tiny_dir, photos, inception_weights, output)
    write = S.PartialResults.write

    def crash_after_first_chunk(self, images, has_logits):
        if self.chunks():
            raise RuntimeError("simulated crash")
        return write(self, images, has_logits)

    monkeypatch.setattr(S.PartialResults, "write", crash_after_first_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(argv)
    assert len(list((output / "partial").glob("chunk-*.npz"))) == 1
    assert not (output / "results.json").exists()
    monkeypatch.undo()

    run(capsys, argv)
    resumed, fresh = results(output), results(first_run)
    assert resumed["run"]["images_this_run"] == N - 3  # the first chunk (3 images) was not redone
    assert resumed["per_k"] == fresh["per_k"]
    assert resumed["work"] == fresh["work"]  # still one encoder call per image

    with pytest.raises(JobError, match="other settings.*seed"):
        main([*argv, "--seed", "1"])


def test_cached_reference_stats_skip_the_real_images(first_run, tiny_dir, photos, inception_weights, tmp_path, capsys):
    out = run(
        capsys,
        sweep_argv(
            tiny_dir,
            photos,
            inception_weights,
            tmp_path / "c",
            "--reference-stats",
            str(first_run / "reference_stats.npz"),
        ),
    )
    assert out["work"]["real_feature_passes"] == 0.0
    assert out["work"]["encoder_calls_per_image"] == 1.0
    assert out["per_k"] == results(first_run)["per_k"]
    assert not (tmp_path / "c" / "reference_stats.npz").exists()


def test_sweep_over_a_token_corpus_matches_the_image_sweep(
    first_run, tiny_dir, photos, inception_weights, tmp_path, capsys
):
    """Pretokenized tokens decode to the same images as tokens made in the sweep (same keys, same noise)."""
    from jobs.pretokenize import main as pretokenize

    corpus = tmp_path / "corpus"
    assert (
        pretokenize(
            ["--model", str(tiny_dir), "--input", str(photos), "--output", str(corpus), "--cpus-per-worker", "0.5"]
        )
        == 0
    )
    capsys.readouterr()
    out = run(
        capsys,
        sweep_argv(
            tiny_dir,
            corpus,
            inception_weights,
            tmp_path / "d",
            "--reference-stats",
            str(first_run / "reference_stats.npz"),
        ),
    )
    assert out["work"]["encoder_calls_per_image"] == 0.0 and out["work"]["real_feature_passes"] == 0.0
    fresh = {row["k"]: row for row in results(first_run)["per_k"]}
    for row in out["per_k"]:
        assert row["psnr"] is None  # no originals in a corpus
        assert row["fid"] == pytest.approx(fresh[row["k"]]["fid"], rel=1e-6)


def test_bad_inputs_are_clear_errors_before_any_work(ray_session, tiny_dir, photos, inception_weights, tmp_path):
    from jobs.eval_sweep import main

    out = tmp_path / "never"
    with pytest.raises(JobError, match=r"k=\[33\] outside 1..32.*32 registers"):
        main([*sweep_argv(tiny_dir, photos, inception_weights, out), "--ks", "1,33"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JobError, match="no image files"):
        main(sweep_argv(tiny_dir, empty, inception_weights, out))
    other = save_reference(
        tmp_path / "other.npz",
        Reference.from_stats(FeatureStats.of(np.eye(3, 2048)), "other-net", "x @ 32px, uint8", "r"),
    )
    with pytest.raises(JobError, match="computed with extractor 'other-net'"):
        main([*sweep_argv(tiny_dir, photos, inception_weights, out), "--reference-stats", str(other)])
    with pytest.raises(JobError, match="--isc.*classifier"):
        main([*sweep_argv(tiny_dir, photos, inception_weights, out), "--isc"])
    config = tmp_path / "sweep.yaml"
    config.write_text("ks: [1, 33]\n")  # a YAML list is parsed like "1,33"
    argv = sweep_argv(tiny_dir, photos, inception_weights, out)
    argv = [a for a in argv if a not in ("--ks", KS)]
    with pytest.raises(JobError, match=r"--ks: k=\[33\] outside"):
        main([*argv, "--config", str(config)])
    assert not out.exists()  # nothing was written


def test_token_counts_from_a_flag_or_a_yaml_list():
    assert S.parse_ks("1,2, 4") == S.parse_ks([1, 2, 4]) == S.parse_ks(["1", "2", "4"]) == [1, 2, 4]
    assert S.parse_ks(8) == [8]
    for bad in ("1,x", [1.5], "1;2", True):
        with pytest.raises(ValueError, match="integers like 1,2,4") as e:
            S.parse_ks(bad)
        assert "--" not in str(e.value)  # the library does not name flags; the jobs do
    assert S.check_ks([4, 1, 4], 32) == (1, 4)


def test_pixel_metrics():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = 255 - b[1]
    mse, psnr, ssim = pixel_metrics(a, b)
    assert mse[0] == 0 and psnr[0] == MAX_PSNR and ssim[0] == pytest.approx(1.0)
    assert mse[1] == pytest.approx(np.mean((a[1].astype(float) - b[1]) ** 2))
    assert psnr[1] == pytest.approx(10 * np.log10(255**2 / mse[1]))
    assert ssim[1] < 0  # an inverted image anti-correlates


def test_noise_depends_on_seed_key_and_k_only(tiny_model):
    a = S.initial_noise(tiny_model, 0, [("x", 1), ("y", 4)])
    b = S.initial_noise(tiny_model, 0, [("y", 4)])
    assert a.shape == (2, 48, 8, 8)
    assert np.array_equal(a[1].numpy(), b[0].numpy())
    assert not np.array_equal(S.initial_noise(tiny_model, 1, [("y", 4)]).numpy(), b.numpy())
    assert not np.array_equal(S.initial_noise(tiny_model, 0, [("y", 2)]).numpy(), b.numpy())


def test_metrics_per_k_with_a_classifier_and_an_adm_reference():
    """IS appears when the features came with logits; an ADM-style reference (mu/sigma only) gives FID and says
    precision/recall are unavailable."""
    rng = np.random.default_rng(0)
    feats = rng.random((12, 2048)).astype(np.float32)
    logits = rng.standard_normal((12, 1008)).astype(np.float32)
    g = S.Gathered(
        keys=[f"k{i}" for i in range(12)],
        labels=np.zeros(12, np.int64),
        errors=[],
        encode_calls=12,
        real_feature_passes=0,
        stats={4: FeatureStats.of(feats)},
        features={4: feats},
        logits={4: logits},
        pixels={4: {m: np.ones(12) for m in ("mse", "psnr", "ssim")}},
        grid={},
    )
    ref_stats = FeatureStats.of(rng.random((30, 2048)))
    adm = Reference(ref_stats.mu, ref_stats.sigma, None, None, None, "VIRTUAL_imagenet256_labeled.npz")
    row = S.metrics_for_k(g, 4, adm, S.MetricOptions(prc=True))
    assert row["fid"] > 0 and row["is_mean"] > 1 and row["psnr"] == 1.0
    assert "precision" not in row and "mu/sigma only" in row["prc_unavailable"]
    assert S.is_unavailable_reason(g) is None
