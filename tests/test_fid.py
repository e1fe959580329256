"""Mergeable statistics, the metrics, reference files, and the eval_fid job against torch-fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from jobs.common import JobError
from pipeline.eval.fid import (
    FeatureStats,
    FrechetReference,
    Reference,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_reference,
    low_rank_factor,
    merge_all,
    precision_recall,
    save_reference,
)
from pipeline.inception import weights_only_loads


def features(n: int, d: int = 64, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.uniform(0.5, 2, d) + shift).astype(np.float32)


# ------------------------------------------------------------------------------------------- statistics
def test_merged_statistics_equal_single_pass():
    x = features(1000, seed=1)
    whole = FeatureStats.of(x)
    parts = [FeatureStats.of(x[:1]), FeatureStats.of(x[1:377]), FeatureStats.of(x[377:])]
    for merged in (merge_all(parts), merge_all(parts[::-1])):
        assert merged.n == whole.n == 1000
        np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(whole.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    streamed = FeatureStats.empty(64)
    for block in np.array_split(x, 7):
        streamed.add(torch.from_numpy(block))
    assert frechet_distance(streamed.mu, streamed.sigma, whole.mu, whole.sigma) == pytest.approx(0, abs=1e-9)


def test_statistics_refuse_mismatched_or_too_few_samples():
    with pytest.raises(ValueError, match="dimension"):
        FeatureStats.of(features(3, d=8)).merge(FeatureStats.of(features(3, d=4)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats.of(features(1)).sigma


# ------------------------------------------------------------------------------------------- metrics
def test_frechet_distance_matches_torch_fidelity_formula():
    a, b = FeatureStats.of(features(300, seed=2)), FeatureStats.of(features(200, seed=3, shift=0.3))
    theirs = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert ours > 1  # the shift is visible


def test_low_rank_route_equals_the_full_eigendecomposition():
    """Fewer samples than dimensions: the n x n trace term (from either side's features) gives the same FID."""
    fake, real = features(20, seed=9, shift=0.1), features(40, seed=10)
    f, r = FeatureStats.of(fake), FeatureStats.of(real)
    full = FrechetReference(r.mu, r.sigma).distance(f.mu, f.sigma)
    assert full == pytest.approx(frechet_distance(f.mu, f.sigma, r.mu, r.sigma), rel=1e-12)
    via_samples = FrechetReference(r.mu, r.sigma).distance(f.mu, f.sigma, low_rank_factor(fake))
    via_reference = FrechetReference(r.mu, r.sigma, low_rank_factor(real)).distance(f.mu, f.sigma)
    assert via_samples == pytest.approx(full, rel=1e-6)
    assert via_reference == pytest.approx(full, rel=1e-6)
    assert low_rank_factor(features(100)) is None  # n >= D: the D x D route


def test_kid_precision_recall_and_is_match_torch_fidelity():
    fake, real = features(120, seed=4, shift=0.2), features(150, seed=5)
    kid = kernel_inception_distance(fake, real, subsets=10, subset_size=100)
    theirs = kid_features_to_metric(
        torch.from_numpy(fake.astype(np.float64)),
        torch.from_numpy(real.astype(np.float64)),
        kid_subsets=10,
        kid_subset_size=100,
        verbose=False,
    )
    assert kid["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert kid["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)

    pr = precision_recall(fake, real)
    theirs = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), verbose=False)
    assert (pr["precision"], pr["recall"]) == (theirs["precision"], theirs["recall"])
    assert 0 < pr["precision"] < 1 and 0 < pr["recall"] < 1

    logits = features(100, d=1008, seed=6)
    ours = inception_score(logits)
    theirs = isc_features_to_metric(torch.from_numpy(logits))
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-9)


def test_kid_with_fewer_samples_than_the_subset_size_uses_them_all():
    """torch-fidelity refuses a subset larger than a set; ours shrinks it to the smaller set and says so."""
    fake, real = features(30, seed=11, shift=0.2), features(40, seed=12)
    kid = kernel_inception_distance(fake, real, subsets=5, subset_size=1000)
    theirs = kid_features_to_metric(
        torch.from_numpy(fake.astype(np.float64)),
        torch.from_numpy(real.astype(np.float64)),
        kid_subsets=5,
        kid_subset_size=30,
        verbose=False,
    )
    assert kid["kid_subset_size"] == 30
    # float64 sums in another order differ in the last bits (seen: ...5522 vs ...5528)
    assert kid["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-12)


# ------------------------------------------------------------------------------------------- references
def test_reference_npz_round_trip(tmp_path):
    x = features(50, seed=7)
    ref = Reference.from_stats(FeatureStats.of(x), "net/a", "crop @ 64px", "photos/", features=x)
    back = load_reference(save_reference(tmp_path / "ref.npz", ref))
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    np.testing.assert_array_equal(back.features, x)
    assert (back.n, back.extractor, back.preprocessing) == (50, "net/a", "crop @ 64px")


def test_adm_reference_batch_is_accepted(tmp_path):
    """ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 (images), mu, sigma, mu_s, sigma_s; no identity."""
    x = features(200, seed=8)
    s = FeatureStats.of(x)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(
        path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=s.mu, sigma=s.sigma, mu_s=s.mu[:4], sigma_s=s.sigma[:4, :4]
    )
    ref = load_reference(path)
    assert ref.extractor is None and ref.n is None and ref.features is None
    ref.check_extractor("inception-v3-compat/pool2048/sha256:anything")  # nothing recorded: accepted
    assert frechet_distance(ref.mu, ref.sigma, s.mu, s.sigma) == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="only mu/sigma"):
        ref.need_features("KID")


def test_mismatched_extractor_identity_is_a_clear_error(tmp_path):
    ref = Reference.from_stats(FeatureStats.of(features(10)), "other-net/pool", "crop", "ref")
    with pytest.raises(ValueError, match="computed with extractor 'other-net/pool'"):
        ref.check_extractor("inception-v3-compat/pool2048/sha256:0123")
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
        load_reference(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def two_folders(imagenet_sample, tmp_path_factory) -> tuple[Path, Path]:
    """2 x 30 ImageNet photos as 64x64 PNGs (already square, so the ADM crop at 64 is the identity)."""
    root = tmp_path_factory.mktemp("fid")
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()
    for i, path in enumerate(sorted(imagenet_sample.glob("*.JPEG"))[:60]):
        img = Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC)
        img.save((a if i % 2 == 0 else b) / f"{i:03d}.png")
    return a, b


def run_job(capsys, argv: list[str]) -> dict:
    from jobs.eval_fid import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_fid_equals_torch_fidelity(ray_session, two_folders, inception_weights, tmp_path, capsys):
    """Same images, the converted real weights: our Ray pipeline and calculate_metrics agree (FID to 1e-3)."""
    import torch_fidelity

    a, b = two_folders
    common = ["--resolution", "64", "--inception-weights", str(inception_weights), "--cpus-per-worker", "0.5"]
    ours = run_job(
        capsys,
        [
            "--real",
            str(a),
            "--fake",
            str(b),
            "--kid",
            "--prc",
            "--kid-subset-size",
            "30",
            "--save-stats",
            str(tmp_path / "a.npz"),
            "--save-fake-stats",
            str(tmp_path / "b.npz"),
            *common,
        ],
    )
    with weights_only_loads():  # torch-fidelity calls torch.load(weights_only=False): force the safe loader
        theirs = torch_fidelity.calculate_metrics(
            input1=str(b),
            input2=str(a),
            fid=True,
            kid=True,
            prc=True,
            kid_subset_size=30,
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=str(inception_weights),
            cuda=False,
            cache=False,
            save_cpu_ram=True,
            verbose=False,
        )
    assert ours["real"]["count"] == ours["fake"]["count"] == 30
    assert ours["fid"] > 10  # two different sets of photos
    assert abs(ours["fid"] - theirs["frechet_inception_distance"]) < 1e-3
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-6)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)

    # saved statistics (with features) replace the images: no Inception pass, same numbers
    again = run_job(capsys, ["--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz"), "--prc", *common])
    assert again["fid"] == pytest.approx(ours["fid"], rel=1e-9)
    assert again["precision"] == ours["precision"]
    assert again["real"]["extractor"] == ours["extractor"] and "feature_passes" not in again["real"]


def test_eval_fid_errors(ray_session, tmp_path, inception_weights):
    from jobs.eval_fid import main

    empty = tmp_path / "empty"
    empty.mkdir()
    w = ["--inception-weights", str(inception_weights)]
    with pytest.raises(JobError, match="no image files"):
        main(["--real", str(empty), "--fake", str(empty), *w])
    other = save_reference(
        tmp_path / "other.npz", Reference.from_stats(FeatureStats.of(features(5, d=2048)), "other-net", "x", "r")
    )
    with pytest.raises(JobError, match="computed with extractor 'other-net'"):
        main(["--real", str(other), "--fake", str(empty), *w])
    with pytest.raises(JobError, match="no classifier|classifier.*none"):
        main(["--real", str(other), "--fake", str(empty), "--isc", *w])
    with pytest.raises(JobError, match="--real is required"):
        main(["--fake", str(empty), *w])
