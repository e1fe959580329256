"""The length predictor: rules that pick k from a PSNR curve, the margin's calibration, files, the fit, and
`pretokenize --adaptive ... --length-predictor` (rows get the predicted k, no decoder call)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shards import sample_files, tar_of_samples

from flextok.checkpoint import read_checkpoint_info
from jobs import pretokenize as pretokenize_job
from jobs import train_length_predictor as train_job
from jobs.common import run_main
from pipeline.data.corpus import SCHEMA, CorpusMeta, validate_corpus
from pipeline.data.length_predictor import (
    LengthPredictor,
    PredictorConfig,
    Rule,
    choose_rungs,
    parse_rule,
    predictor_digest,
)
from pipeline.data.preprocess import center_crop_adm, decode_image, to_model_input
from pipeline.train.length_predictor import (
    FitConfig,
    Table,
    fit_length_predictor,
    fit_on_ray_train,
    fold_of_each_row,
)

LADDER = (1, 2, 4, 8, 16, 32)


def curves(n: int, seed: int = 0) -> np.ndarray:
    """[n, 6] rising PSNR curves of different heights, with a little non-monotone noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(10, 16, (n, 1)) + np.log2(LADDER)[None] * rng.uniform(0.3, 1.0, (n, 1))
    return base + rng.normal(0, 0.2, (n, len(LADDER)))


def config(levels=(8, 8, 8, 5, 5, 5), digest: str = "") -> PredictorConfig:
    return PredictorConfig(ladder=LADDER, num_registers=32, fsq_levels=tuple(levels), tokenizer_sha256=digest)


def tiny_predictor(cfg: PredictorConfig, n: int = 40) -> LengthPredictor:
    """Untrained, started from a mean curve, with noisy calibration curves."""
    torch.manual_seed(0)
    model = LengthPredictor(cfg)
    truth = torch.as_tensor(curves(n), dtype=torch.float32)
    model.init_offset(truth)
    model.register_buffer("calib_psnr", truth)
    model.register_buffer("calib_pred", truth + torch.randn_like(truth))
    return model.eval()


# ------------------------------------------------------------------ rules
def test_parse_rule_takes_a_threshold_or_a_slope_and_nothing_else():
    assert parse_rule("psnr:15.5") == Rule("psnr", 15.5)
    assert parse_rule("PSNR-slope:0.1") == Rule("psnr-slope", 0.1)
    for bad in ("inception:0.1", "psnr-slope:x", "psnr-slope:-1", "psnr:0", "slope"):
        with pytest.raises(ValueError, match="^adaptive "):
            parse_rule(bad)


def test_threshold_takes_the_first_rung_the_curve_minus_the_margin_meets():
    curve = np.array([[10, 12, 14, 16, 18, 20], [10, 10, 10, 10, 10, 11.0]])
    k, missed = choose_rungs(curve, LADDER, Rule("psnr", 14))
    assert k.tolist() == [4, 32] and missed.tolist() == [False, True]
    k, missed = choose_rungs(curve, LADDER, Rule("psnr", 14), margin=3)
    assert k.tolist() == [16, 32] and missed.tolist() == [False, True]


def test_slope_takes_the_rung_maximising_psnr_minus_lambda_k():
    table = curves(30)
    for lam in (0.0, 0.05, 0.3, 5.0):
        k, missed = choose_rungs(table, LADDER, Rule("psnr-slope", lam))
        best = [max(LADDER, key=lambda kk, row=row: row[LADDER.index(kk)] - lam * kk) for row in table]
        assert k.tolist() == best and not missed.any()
    assert (choose_rungs(table, LADDER, Rule("psnr-slope", 0.0))[0] >= 16).all()  # free tokens: near the top


def test_margin_is_the_smallest_that_meets_the_conformal_share_of_reachable_photos():
    """R reachable calibration photos, coverage 0.9: the share must be ceil(0.9 (R + 1)) / R, a little above 0.9."""
    model = tiny_predictor(config())
    pred, true = model.calib_pred.double().numpy(), model.calib_psnr.double().numpy()
    target = float(np.median(true[:, 3]))
    margin = model.margin(target)
    reachable = (true >= target).any(axis=1)
    need = math.ceil(0.9 * (reachable.sum() + 1)) / reachable.sum()
    assert 0.9 < need <= 1

    def met_share(m: float) -> float:
        k, _ = choose_rungs(pred, LADDER, Rule("psnr", target), m)
        cols = [LADDER.index(int(x)) for x in k]
        return float((true[np.arange(len(true)), cols] >= target)[reachable].mean())

    assert met_share(margin) >= need
    assert margin == 0 or met_share(margin - 0.05) < need


def test_margin_is_zero_when_no_calibration_photo_can_meet_the_target():
    model = tiny_predictor(config())
    assert model.margin(float(model.calib_psnr.max()) + 1) == 0.0


# ------------------------------------------------------------------ model and files
def test_predicted_curves_never_fall_along_the_ladder():
    model = tiny_predictor(config())
    tokens = torch.randint(0, 64000, (16, 32))
    assert (np.diff(model.predict(tokens), axis=1) >= 0).all()


def test_save_and_load_give_the_same_predictions_and_calibration(tmp_path):
    model = tiny_predictor(config())
    model.save(tmp_path / "p")
    back = LengthPredictor.load(tmp_path / "p")
    tokens = torch.randint(0, 64000, (4, 32))
    assert back.cfg == model.cfg
    assert np.array_equal(back.predict(tokens), model.predict(tokens))
    assert torch.equal(back.calib_pred, model.calib_pred) and back.margin(14) == model.margin(14)


def test_load_refuses_unknown_config_keys(tmp_path):
    tiny_predictor(config()).save(tmp_path / "p")
    raw = json.loads((tmp_path / "p" / "config.json").read_text())
    raw["config"]["__class__"] = "os.system"
    (tmp_path / "p" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unknown keys"):
        LengthPredictor.load(tmp_path / "p")


def test_fit_beats_the_mean_curve_when_quality_depends_on_the_tokens():
    """Synthetic, with a 2-register tokenizer: PSNR rises with the first register's first FSQ digit; the fit must
    find that out of fold."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, (120, 2))  # FSQ levels (8, 5): 40 ids
    digit = (tokens[:, 0] % 8).astype(np.float64)  # [N] 0..7
    psnr = 10 + digit[:, None] + np.log2(LADDER)[None] * 0.5 + rng.normal(0, 0.1, (120, len(LADDER)))
    cfg = PredictorConfig(ladder=LADDER, num_registers=2, fsq_levels=(8, 5))
    model, report = fit_length_predictor(Table(tokens, psnr), cfg, FitConfig(steps=300, folds=3))
    assert np.mean(report["rmse_out_of_fold_db"]) < 0.5 * np.mean(report["rmse_mean_curve_db"])
    assert model.calib_pred.shape == (120, len(LADDER))


def synthetic_table(n: int, seed: int, offset: float = 0.0) -> Table:
    """2-register tokens; PSNR rises with the first register's first FSQ digit, `offset` dB lower overall."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 40, (n, 2))
    digit = (tokens[:, 0] % 8).astype(np.float64)
    psnr = 10 - offset + digit[:, None] + np.log2(LADDER)[None] * 0.5 + rng.normal(0, 0.1, (n, len(LADDER)))
    return Table(tokens, psnr)


def test_a_calibration_table_sets_the_margin_from_photos_the_fit_never_saw():
    """Photos 1 dB worse than the training photos (as new photos are for a tokenizer that trained on its own):
    calibrated on them, the margin covers the shift; calibrated out of fold on the training photos, it cannot."""
    cfg = PredictorConfig(ladder=LADDER, num_registers=2, fsq_levels=(8, 5))
    fit = FitConfig(steps=300, folds=3)
    train, unseen = synthetic_table(120, 0), synthetic_table(60, 1, offset=1.0)
    own, _ = fit_length_predictor(train, cfg, fit)
    calibrated, report = fit_length_predictor(train, cfg, fit, calibration=unseen)
    assert np.array_equal(calibrated.calib_pred.numpy(), calibrated.predict(unseen.tokens).astype(np.float32))
    assert np.array_equal(calibrated.calib_psnr.numpy(), unseen.psnr.astype(np.float32))
    assert np.mean(report["bias_calibration_db"]) == pytest.approx(1.0, abs=0.2)
    assert calibrated.margin(14.0) >= own.margin(14.0) + 0.7


def test_a_photos_views_share_a_cross_fitting_fold():
    """Rows that are views (crops) of one photo land in one fold, so no photo is predicted out of fold from a
    model that saw another view of it; every fold gets photos."""
    groups = np.repeat(np.arange(30), 4)  # 30 photos, 4 views each
    table = Table(np.zeros((120, 2), np.int64), np.zeros((120, len(LADDER))), groups)
    folds = fold_of_each_row(table, FitConfig(folds=3))
    for photo in range(30):
        assert len(set(folds[groups == photo])) == 1
    assert sorted(np.bincount(folds)) == [40, 40, 40] and table.photos == 30


def test_ray_train_spreads_the_fits_over_workers_and_gives_the_in_process_predictor(ray_session, tmp_path):
    cfg = PredictorConfig(ladder=LADDER, num_registers=2, fsq_levels=(8, 5))
    fit = FitConfig(steps=100, folds=3)
    train, unseen = synthetic_table(60, 0), synthetic_table(30, 1, offset=1.0)
    local, local_report = fit_length_predictor(train, cfg, fit, calibration=unseen)
    remote, remote_report = fit_on_ray_train(train, cfg, fit, 2, str(tmp_path), calibration=unseen)
    tokens = synthetic_table(10, 2).tokens
    np.testing.assert_allclose(remote.predict(tokens), local.predict(tokens), atol=1e-4)
    np.testing.assert_allclose(remote_report["rmse_out_of_fold_db"], local_report["rmse_out_of_fold_db"], atol=1e-3)
    assert remote.cfg == cfg and remote_report["calibration"] == local_report["calibration"]
    assert (tmp_path / "fit").is_dir()  # Ray Train's run folder, with its checkpoint


# ------------------------------------------------------------------ jobs
@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-flextok")
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def predictor_dir(tiny_model, model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predictor")
    digest = read_checkpoint_info(model_dir).digest()
    tiny_predictor(config(tiny_model.cfg.fsq_levels, digest)).save(folder)
    return folder


def write_table(path: Path, n: int, seed: int, ladder=LADDER, timesteps: int = 25, views: int = 1) -> Path:
    """A bench/adaptive.py table.npz of n rows: n / views photos with `views` rows each."""
    rng = np.random.default_rng(seed)
    np.savez(
        path, tokens=rng.integers(0, 64000, (n, 32)), psnr=curves(n, seed)[:, : len(ladder)], ladder=np.array(ladder),
        timesteps=timesteps, guidance_scale=1.0, groups=np.arange(n) // views,
    )  # fmt: skip
    return path


def test_train_job_writes_a_predictor_for_the_table_and_the_tokenizer(ray_session, model_dir, tiny_model, tmp_path):
    table, calib = write_table(tmp_path / "table.npz", 20, 0), write_table(tmp_path / "calib.npz", 10, 1)
    argv = ["--model", str(model_dir), "--table", str(table), "--output", str(tmp_path / "p")]
    assert train_job.main(argv + ["--steps", "20", "--folds", "2", "--calibration", str(calib)]) == 0
    predictor = LengthPredictor.load(tmp_path / "p")
    cfg = predictor.cfg
    assert cfg.ladder == LADDER and cfg.tokenizer_sha256 == read_checkpoint_info(model_dir).digest()
    assert cfg.decoding == "timesteps=25,guidance_scale=1"
    assert predictor.calib_psnr.shape == (10, len(LADDER))  # the calibration table's photos
    fit = json.loads((tmp_path / "p" / "fit.json").read_text())
    assert fit["calibration_table"] == str(calib) and fit["workers"] == 1


def test_train_job_counts_photos_by_the_tables_groups(ray_session, model_dir, tmp_path):
    table = write_table(tmp_path / "table.npz", 24, 0, views=3)  # 8 photos, 3 views each
    argv = ["--model", str(model_dir), "--table", str(table), "--output", str(tmp_path / "p")]
    assert train_job.main(argv + ["--steps", "5", "--folds", "2"]) == 0
    fit = json.loads((tmp_path / "p" / "fit.json").read_text())
    assert (fit["photos"], fit["rows"]) == (8, 24)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda p: write_table(p, 10, 1, ladder=(1, 2, 4)), "another ladder"),
        (lambda p: write_table(p, 10, 1, timesteps=10), "decoded with timesteps"),
        (lambda p: p.with_name("missing.npz"), "not found"),
    ],
)
def test_train_job_refuses_a_calibration_table_that_does_not_match(model_dir, tmp_path, capsys, make, why):
    table, calib = write_table(tmp_path / "table.npz", 20, 0), make(tmp_path / "calib.npz")
    argv = ["--model", str(model_dir), "--table", str(table), "--output", str(tmp_path / "p")]
    assert run_main(train_job.main, argv + ["--calibration", str(calib)]) == 2
    assert why in capsys.readouterr().err


@pytest.fixture(scope="module")
def predicted_corpus(ray_session, model_dir, predictor_dir, imagenet_sample, tmp_path_factory):
    files = sample_files(imagenet_sample, 6)
    folder = tmp_path_factory.mktemp("predicted")
    tar = tar_of_samples(imagenet_sample, folder / "s.tar", files)
    out = folder / "out"
    argv = ["--model", str(model_dir), "--input", str(tar), "--output", str(out), "--batch-size", "4"]
    argv += ["--adaptive", "psnr:14", "--length-predictor", str(predictor_dir)]
    assert pretokenize_job.main(argv) == 0
    return files, out


def test_rows_get_the_predicted_k_with_no_decoder_call(predicted_corpus, predictor_dir, tiny_model):
    files, out = predicted_corpus
    crops = np.stack([center_crop_adm(decode_image(f.read_bytes()), 32) for f in files])
    tokens = tiny_model.tokenize(to_model_input(crops))
    want, missed = LengthPredictor.load(predictor_dir).choose(tokens, Rule("psnr", 14))
    rows = {r["key"]: r for r in pq.read_table(out / "data", schema=SCHEMA).to_pylist()}
    for i, f in enumerate(files):
        assert rows[f.stem]["tokens"] == tokens[i, : int(want[i])].tolist()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["adaptive"]["decodes"] == 0 and manifest["adaptive"]["missed"] == int(missed.sum())
    assert validate_corpus(str(out)).problems == []


def test_metadata_records_the_predictor_path_and_digest(predicted_corpus, predictor_dir):
    _, out = predicted_corpus
    meta = CorpusMeta.from_kv(json.loads((out / "_manifest.json").read_text())["metadata"])
    assert meta.adaptive_criterion == "psnr" and meta.ladder == list(LADDER)
    assert meta.adaptive_decoding == f"length-predictor={predictor_dir},sha256={predictor_digest(predictor_dir)}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adaptive", "psnr:14", "--length-predictor", "{missing}"], "not a length predictor folder"),
        (["--adaptive", "psnr:14", "--length-predictor", "{other}"], "another tokenizer"),
        (["--adaptive", "psnr:14", "--length-predictor", "{good}", "--ladder", "1,2,4"], "predicts the k's"),
        (["--adaptive", "inception:0.1", "--length-predictor", "{good}"], "psnr-slope:LAMBDA"),
        (["--length-predictor", "{good}"], "needs --adaptive"),
    ],
)
def test_bad_predictor_options_are_one_line_errors(
    model_dir, predictor_dir, tiny_model, imagenet_sample, tmp_path, capsys, extra, message
):
    other = tmp_path / "other"
    tiny_predictor(config(tiny_model.cfg.fsq_levels, "f" * 64)).save(other)
    paths = {"missing": tmp_path / "nope", "other": other, "good": predictor_dir}
    extra = [a.format(**paths) for a in extra]
    argv = ["--model", str(model_dir), "--input", str(imagenet_sample), "--output", str(tmp_path / "o")] + extra
    assert run_main(pretokenize_job.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_the_shipped_predictor_belongs_to_the_shipped_tokenizer():
    """models/length-predictor-small is what `pretokenize --length-predictor` gets for models/flextok-small: its
    config names that tokenizer's digest, registers, FSQ levels and the default ladder, and it loads."""
    repo = Path(__file__).resolve().parents[1]
    predictor = LengthPredictor.load(repo / "models" / "length-predictor-small")
    info = read_checkpoint_info(repo / "models" / "flextok-small")
    assert predictor.cfg.tokenizer_sha256 == info.digest()
    assert (predictor.cfg.num_registers, predictor.cfg.fsq_levels) == (info.cfg.num_registers, info.cfg.fsq_levels)
    assert predictor.cfg.ladder == LADDER and predictor.calib_psnr.shape == (50, len(LADDER))
