"""The reconstruction sweep on a tiny FlexTok over real ImageNet photos: outputs, counters, determinism,
resume after a crash, cached reference statistics, an fsspec output, a token-corpus input, clear errors; and the
driver's bounded read-back of partial results."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from flextok.checkpoint import weights_digest
from jobs.common import JobError
from pipeline.eval import sweep as S
from pipeline.eval import sweep_results as SR
from pipeline.eval.fid import FeatureStats, FrechetReference, Reference, low_rank_factor, save_reference
from pipeline.eval.report import MetricOptions, fid_figure, metrics_for_k
from pipeline.image_metrics import MAX_PSNR, pixel_metrics
from pipeline.inception import FEATURE_DIM

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


def results(output: Path | str) -> dict:
    with fsspec.open(f"{output}/results.json") as f:
        return json.load(f)


def chunk_arrays(partial: Path) -> list[dict]:
    """Every saved chunk's arrays, in order."""
    out = []
    for path in sorted(partial.glob("chunk-*.npz")):
        with np.load(path) as z:
            out.append({name: z[name] for name in z.files})
    return out


def torch_fidelity_fid(fake: np.ndarray, real: np.ndarray) -> float:
    """FID from torch-fidelity's own statistics and formula (scipy's sqrtm: slow beyond a few hundred dims)."""
    stats = [fid_features_to_statistics(torch.from_numpy(x.astype(np.float64))) for x in (fake, real)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


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
    chunks = chunk_arrays(first_run / "partial")
    real = np.concatenate([c[f"features_{S.REAL}"] for c in chunks])
    ref = FrechetReference(real.mean(0), np.cov(real, rowvar=False), low_rank_factor(real))
    for row in r["per_k"]:
        assert row["num_samples"] == row["subset_size"] == N  # N <= the feature subset: every image
        fake = np.concatenate([c[f"features_{row['k']}"] for c in chunks]).astype(np.float64)
        # the FID of this k's saved features against the originals' (the formula is checked against
        # torch-fidelity in test_fid.py; torch-fidelity's sqrtm in 2048-d would take minutes here)
        assert row["fid"] == pytest.approx(ref.distance(fake.mean(0), np.cov(fake, rowvar=False)), rel=1e-6)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["is_mean"] is None  # the converted weights have no classifier ...
        assert 0 < row["psnr"] < MAX_PSNR and -1 <= row["ssim"] <= 1 and row["mse"] > 0
    assert "classifier" in r["is_unavailable"]  # ... and results.json says why
    work = {k: v for k, v in r["work"].items() if k != "class_counts"}
    assert work == {
        "images": N,
        "bad_inputs": 0,
        "encoder_calls_per_image": 1.0,
        "real_feature_passes": 1.0,
        "decodes_per_image": 3.0,  # counted from the stage's rows: one decoder output per (image, k)
    }
    assert r["feature_subset"]["limit"] == 10_000
    p = r["provenance"]
    assert p["model"]["sha256"] == weights_digest(tiny_model.state_dict())
    assert p["seeds"]["seed"] == 0 and p["settings"]["ks"] == [1, 4, 32] and p["settings"]["timesteps"] == 3
    assert p["reference"]["computed_in_this_pass"] and p["reference"]["n"] == N
    assert p["inception"]["classifier"] is False and len(p["data"]["keys_sha256"]) == 64
    assert (first_run / "results.md").read_text().count("\n") == 2 + 3


def test_recon_grid_holds_originals_and_every_k(first_run):
    g = SR.gather(SR.PartialResults(first_run / "partial", {}, (S.REAL, 1, 4, 32)))
    assert len(g.grid) == 3  # --grid-images 3: the first three inputs
    assert list(g.grid) == [str(k) for k in chunk_arrays(first_run / "partial")[0]["keys"]][:3]
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
    write = SR.PartialResults.write

    def crash_after_first_chunk(self, images, has_logits):
        if self.chunks():
            raise RuntimeError("simulated crash")
        return write(self, images, has_logits)

    monkeypatch.setattr(SR.PartialResults, "write", crash_after_first_chunk)
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


def test_cached_reference_stats_skip_the_real_images_and_any_fsspec_url_takes_the_output(
    first_run, tiny_dir, photos, inception_weights, capsys
):
    output = "memory://sweeps/c"  # not the driver's disk: results and partial chunks go to the URL
    ref = str(first_run / "reference_stats.npz")
    out = run(capsys, sweep_argv(tiny_dir, photos, inception_weights, output, "--reference-stats", ref))
    assert out["work"]["real_feature_passes"] == 0.0
    assert out["work"]["encoder_calls_per_image"] == 1.0
    assert out["per_k"] == results(first_run)["per_k"] == results(output)["per_k"]
    fs = fsspec.filesystem("memory")
    assert len(fs.glob("/sweeps/c/partial/chunk-*.npz")) == 3  # 8 images in chunks of 3
    assert not fs.exists("/sweeps/c/reference_stats.npz")


def test_sweep_over_a_token_corpus_matches_the_image_sweep(
    first_run, tiny_dir, photos, inception_weights, tmp_path, capsys
):
    """Pretokenized tokens decode to the same images as tokens made in the sweep (same keys, same noise). The
    corpus holds two views per image (flip): the sweep scores the un-augmented one, once per image."""
    from jobs.pretokenize import main as pretokenize

    corpus = tmp_path / "corpus"
    argv = ["--model", str(tiny_dir), "--input", str(photos), "--output", str(corpus), "--augment", "flip"]
    assert pretokenize([*argv, "--cpus-per-worker", "0.5"]) == 0
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
    assert out["work"]["images"] == N
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


def test_adaptive_targets_reread_the_decoded_table_and_report_rate_against_quality(
    first_run, tiny_dir, photos, inception_weights, tmp_path, capsys
):
    """Targets are not part of the fingerprint: a rerun with --adaptive decodes nothing, it replays each image's
    search on the saved table and reports mean tokens against PSNR and rFID, beside every fixed k."""
    from pipeline.data.adaptive import Criterion
    from pipeline.eval.sweep_adaptive import choose

    output = tmp_path / "adaptive"
    shutil.copytree(first_run, output)
    chunks = chunk_arrays(output / "partial")
    psnr = np.concatenate([np.stack([c[f"psnr_{k}"] for k in (4, 32)], axis=1) for c in chunks])  # [N, 2]
    target = float(np.median(psnr))  # met by some images at some k, not by all
    argv = sweep_argv(tiny_dir, photos, inception_weights, output, "--adaptive", f"psnr:{target!r},inception:0.3")
    run(capsys, [*argv, "--ladder", "4,32"])
    r = results(output)
    assert r["run"]["images_this_run"] == 0 and r["work"]["decodes_per_image"] == 3.0
    assert r["per_k"] == results(first_run)["per_k"]
    a = r["adaptive"]
    assert a["ladder"] == [4, 32] and [(f["k"], f["mean_tokens"]) for f in a["fixed_k"]] == [(1, 1), (4, 4), (32, 32)]
    expected = choose(psnr, (4, 32), Criterion("psnr", target))
    by_psnr, by_inception = a["targets"]
    assert by_psnr["target"] == f"psnr:{target:g}" and by_inception["target"] == "inception:0.3"
    assert by_psnr["mean_tokens"] == pytest.approx(expected.k.mean()) and by_psnr["missed"] == expected.missed.sum()
    for t in a["targets"]:
        assert t["images"] == t["num_samples"] == N and t["fid"] is not None and 0 < t["psnr"] < MAX_PSNR
        assert 4 <= t["mean_tokens"] <= 32 and 0 <= t["missed"] <= N
        assert 1 <= t["decodes_if_searched"]["max"] <= t["decodes_if_searched"]["bound"] == 2
        assert set(t["k_histogram"]) <= {"4", "32"} and sum(t["k_histogram"].values()) == N
    assert (r["files"]["rate_plot"], r["files"]["adaptive_grid"]) == ("rate_vs_quality.png", "adaptive_grid.png")
    assert (output / "rate_vs_quality.png").is_file() and (output / "adaptive_grid.png").is_file()
    assert f"| psnr:{target:g} |" in (output / "results.md").read_text()


def test_bad_adaptive_values_are_one_line_errors_before_any_work(
    ray_session, tiny_dir, photos, inception_weights, tmp_path
):
    from jobs.eval_sweep import main

    out = tmp_path / "never"
    argv = sweep_argv(tiny_dir, photos, inception_weights, out)
    for extra, message in [
        (["--adaptive", "psnr:abc"], "target 'abc' is not a number"),
        (["--adaptive", "ssim:0.5"], "CRITERION one of"),
        (["--adaptive", "psnr:14,psnr:14"], "repeated"),
        (["--adaptive", "psnr:14", "--ladder", "1,2"], r"--ladder \[1, 2\]: k=\[2\] not among the sweep's k's"),
        (["--adaptive", "psnr:14", "--ladder", "4,1"], "strictly increasing"),
        (["--ladder", "1,4"], "--ladder needs --adaptive"),
    ]:
        with pytest.raises(JobError, match=message) as e:
            main([*argv, *extra])
        assert "\n" not in str(e.value)
    assert not out.exists()


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


def test_noise_depends_on_seed_and_key_only(tiny_model):
    a = S.initial_noise(tiny_model, 0, [("x", 1), ("y", 4)])
    b = S.initial_noise(tiny_model, 0, [("y", 4)])
    assert a.shape == (2, 48, 8, 8)
    assert np.array_equal(a[1].numpy(), b[0].numpy())
    assert not np.array_equal(S.initial_noise(tiny_model, 1, [("y", 4)]).numpy(), b.numpy())
    assert not np.array_equal(S.initial_noise(tiny_model, 0, [("x", 4)]).numpy(), b.numpy())
    # every k of an image starts from the same noise: a grid row is one image gaining detail
    assert np.array_equal(S.initial_noise(tiny_model, 0, [("y", 2)]).numpy(), b.numpy())


def test_metrics_per_k_with_a_classifier_and_an_adm_reference():
    """IS appears when the features came with logits; an ADM-style reference (mu/sigma only) gives FID and says
    precision/recall are unavailable."""
    rng = np.random.default_rng(0)
    feats = rng.random((12, 64)).astype(np.float32)  # 64-d: torch-fidelity's sqrtm stays fast
    logits = rng.standard_normal((12, 1008)).astype(np.float32)
    s = SR.PerK(FeatureStats.empty(64), SR.Subset(100, dim=64))
    s.add(SR.key_priority(0, [f"k{i}" for i in range(12)]), feats, logits, {m: np.ones(12) for m in SR.PIXEL_METRICS})
    real = rng.random((30, 64))
    ref_stats = FeatureStats.of(real)
    adm = Reference(ref_stats.mu, ref_stats.sigma, None, None, None, "VIRTUAL_imagenet256_labeled.npz")
    row = metrics_for_k(s, 4, adm, MetricOptions(prc=True))
    assert row["fid"] == pytest.approx(torch_fidelity_fid(feats, real), rel=1e-6)
    assert row["is_mean"] == isc_features_to_metric(torch.from_numpy(logits))["inception_score_mean"]
    assert row["psnr"] == 1.0 and row["subset_size"] == 12
    assert "precision" not in row and "mu/sigma only" in row["prc_unavailable"]


# ------------------------------------------------------------------------------------------ bounded read-back
def image_results(n: int, groups: tuple[int, ...], start: int = 0) -> list[SR.ImageResult]:
    """n synthetic finished images (features 2048-d, seeded by the image index) for PartialResults.write."""
    out = []
    for i in range(start, start + n):
        r = SR.ImageResult(f"img-{i:05d}", i % 3, encode_calls=1, decode_calls=len(groups))
        for k in groups:
            f = np.random.default_rng(i * 100 + k).random(FEATURE_DIM).astype(np.float32)
            r.rows[k] = {"features": f, "logits": None, "png": b"", "mse": 1.0, "psnr": 2.0, "ssim": 0.5}
        out.append(r)
    return out


def written(url: str, n: int, chunk: int, groups=(1, 4)) -> SR.PartialResults:
    partial = SR.PartialResults(url, {"test": n}, groups)
    partial.open()
    for start in range(0, n, chunk):
        partial.write(image_results(min(chunk, n - start), groups, start), has_logits=False)
    return partial


def gathered_nbytes(g: SR.Gathered) -> int:
    """What the driver holds per k after reading every chunk back: statistics and the feature subset."""
    return sum(s.subset.nbytes + s.stats.sum.nbytes + s.stats.outer.nbytes for s in g.per_k.values())


def test_gathered_state_does_not_grow_with_the_number_of_images():
    small = SR.gather(written("memory://bounded/small", 40, chunk=16), subset_size=24)
    large = SR.gather(written("memory://bounded/large", 400, chunk=16), subset_size=24)
    assert (small.images, large.images) == (40, 400)
    assert large.per_k[4].stats.n == 400 and len(large.per_k[4].subset.features) == 24
    assert gathered_nbytes(small) == gathered_nbytes(large)


def test_feature_subset_is_every_image_up_to_its_size_and_otherwise_independent_of_chunking():
    partial = written("memory://subset/a", 30, chunk=7)
    all_features = np.stack([r.rows[4]["features"] for r in image_results(30, (1, 4))])
    whole = SR.gather(partial, subset_size=30).per_k[4]
    np.testing.assert_array_equal(whole.subset.features, all_features)  # N <= size: all, in input order
    assert whole.subset.complete
    sampled = SR.gather(partial, subset_size=10).per_k[4].subset
    rechunked = SR.gather(written("memory://subset/b", 30, chunk=11), subset_size=10).per_k[4].subset
    np.testing.assert_array_equal(sampled.features, rechunked.features)
    assert len(sampled.features) == 10 and not sampled.complete
    other_k = SR.gather(partial, subset_size=10).per_k[1].subset  # the same images for every k
    np.testing.assert_array_equal(other_k.priority, sampled.priority)
    assert SR.gather(partial, subset_size=10, seed=1).per_k[4].subset.priority.tolist() != sampled.priority.tolist()


def test_partial_results_resume_only_with_the_same_settings():
    partial = written("memory://resume/a", 5, chunk=5)
    assert SR.PartialResults("memory://resume/a", {"test": 5}, (1, 4)).done_keys() == {f"img-{i:05d}" for i in range(5)}
    with pytest.raises(SR.ResumeMismatchError, match=r"differs in \['test'\]"):
        SR.PartialResults(partial.url, {"test": 6}, (1, 4)).open()


class Rows:
    """A stand-in for a Ray Dataset of stage rows (Collector only iterates batches)."""

    def __init__(self, keys: list[str], ks: tuple[int, ...]):
        n = len(keys) * len(ks)
        self.batch = {
            "key": np.array([key for key in keys for _ in ks], object),
            "label": np.zeros(n, np.int64),
            "k": np.array(list(ks) * len(keys), np.int16),
            "png": np.array([b""] * n, object),
            "features": np.zeros((n, FEATURE_DIM), np.float32),
            "encode_calls": np.zeros(n, np.int32),
            "decode_calls": np.ones(n, np.int32),
            "feature_pass": np.ones(n, np.int8),
            **{m: np.zeros(n) for m in SR.PIXEL_METRICS},
        }

    def iter_batches(self, **_):
        yield self.batch


def test_collector_refuses_a_key_twice_and_skips_images_an_earlier_run_finished():
    partial = written("memory://collector/a", 2, chunk=2)  # img-00000, img-00001 done
    c = SR.Collector(partial, (1, 4), chunk_images=10)
    c.consume(Rows(["img-00001", "img-00002"], (1, 4)))  # a resumed generation group re-emits img-00001
    assert c.images_this_run == 1
    with pytest.raises(ValueError, match="'img-00003' appears again"):
        SR.Collector(partial, (1, 4), chunk_images=10).consume(Rows(["img-00003", "img-00003"], (1, 4)))


def test_a_corpus_sweep_scores_the_unaugmented_view_or_refuses(ray_session):
    import ray

    rows = [{"key": key, "aug": aug} for key in ("a", "b") for aug in (0, 1)]
    kept = S.center_views(ray.data.from_items(rows), "flip").take_all()
    assert sorted((r["key"], r["aug"]) for r in kept) == [("a", 0), ("b", 0)]
    for augment in ("tencrop", "random-flip"):
        with pytest.raises(ValueError, match=f"augment '{augment}'.*aug 0"):
            S.center_views(ray.data.from_items(rows), augment)


def test_decodes_per_image_counts_the_decoder_outputs(tiny_dir):
    """The stage marks each image the decoder returned; the count equals what detokenize was asked for."""
    stage = S.ReconstructStage(str(tiny_dir), (1, 4, 32), {"timesteps": 1, "decode_batch": 4}, [], True)
    asked = []
    detokenize = stage.model.detokenize
    stage.model.detokenize = lambda prefixes, *a, **kw: asked.append(len(prefixes)) or detokenize(prefixes, *a, **kw)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    batch = {"key": np.array(["x", "y", "bad"], object), "image": images, "error": np.array(["", "", "E: x"], object)}
    out = stage(batch)
    assert sum(asked) == 2 * 3  # two good images x three k's, in batches of 4
    assert out["decode_calls"].sum() == sum(asked)
    assert out["decode_calls"][out["k"] <= S.REAL].sum() == 0  # originals and errors are not decoder outputs
