"""Per-image length search (pipeline.data.adaptive): bisection logic on fake decoders, then on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.adaptive import (
    Criterion,
    Decoding,
    PSNRScorer,
    best_slope,
    bisect_ladder,
    bisect_slope,
    decode_prefixes,
    default_ladder,
    image_noise,
    max_decodes,
    non_monotone,
    parse_adaptive,
    parse_ladder,
    search_ladder,
    search_lengths,
    smallest_meeting,
)


class FakeDecoder:
    """Scores from a table [N, L] instead of decoding; records every call."""

    def __init__(self, table: np.ndarray, ladder: list[int]):
        self.table, self.column = table, {k: j for j, k in enumerate(ladder)}
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, idx: np.ndarray, ks: np.ndarray) -> np.ndarray:
        self.calls.append((idx.tolist(), ks.tolist()))
        return self.table[idx, [self.column[int(k)] for k in ks]]


def monotone_table(rng: np.random.Generator, n: int, rungs: int) -> np.ndarray:
    return np.cumsum(rng.uniform(0, 3, size=(n, rungs)), axis=1) + 10  # PSNR-like, increasing in k


# ------------------------------------------------------------------------------------------ parsing
def test_parse_adaptive_accepts_every_criterion():
    assert parse_adaptive("psnr:24") == Criterion("psnr", 24.0)
    assert parse_adaptive("inception:0.15") == Criterion("inception", 0.15)
    assert parse_adaptive("PSNR-slope:0.1") == Criterion("psnr-slope", 0.1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("psnr", "expected CRITERION:TARGET"),
        ("ssim:0.5", "expected CRITERION:TARGET"),
        ("psnr:high", "is not a number"),
        ("psnr:nan", "must be finite"),
        ("psnr:-3", "(0, 100]"),
        ("inception:5", "[0, 2]"),
        ("psnr-slope:0", "LAMBDA"),
    ],
)
def test_parse_adaptive_rejects_bad_values_in_one_line(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        parse_adaptive(text)
    assert "\n" not in str(info.value)


def test_default_ladder_is_powers_of_two_up_to_the_registers():
    assert default_ladder(32) == [1, 2, 4, 8, 16, 32]
    assert default_ladder(24) == [1, 2, 4, 8, 16, 24]


def test_parse_ladder_checks_order_and_range():
    assert parse_ladder("2,5,9", 16) == [2, 5, 9]
    assert parse_ladder(None, 8) == [1, 2, 4, 8]
    for bad, message in (("4,2", "increasing"), ("0,4", "1..16"), ("4,32", "1..16"), ("a,b", "integers")):
        with pytest.raises(ValueError, match=message):
            parse_ladder(bad, 16)


# ------------------------------------------------------------------------------------------ bisection
@pytest.mark.parametrize("rungs", [1, 2, 3, 6, 9, 32])
def test_bisection_finds_the_smallest_meeting_k_on_monotone_scores(rungs):
    rng = np.random.default_rng(rungs)
    ladder = list(range(1, rungs + 1))
    table = monotone_table(rng, 200, rungs)
    crit = Criterion("psnr", float(np.median(table)))
    result = bisect_ladder(200, ladder, crit, FakeDecoder(table, ladder))
    want_k, want_missed = smallest_meeting(table, ladder, crit)
    np.testing.assert_array_equal(result.k, want_k)
    np.testing.assert_array_equal(result.missed, want_missed)


@pytest.mark.parametrize("rungs", [1, 2, 5, 6, 8, 17])
def test_bisection_stays_within_the_decode_bound(rungs):
    ladder = list(range(1, rungs + 1))
    table = monotone_table(np.random.default_rng(0), 300, rungs)
    fake = FakeDecoder(table, ladder)
    result = bisect_ladder(300, ladder, Criterion("psnr", float(np.median(table))), fake)
    assert result.decodes.max() <= max_decodes(rungs) <= int(np.ceil(np.log2(rungs))) + 1
    assert len(fake.calls) <= max_decodes(rungs)  # lockstep: one call per round for the whole batch
    assert result.decodes.sum() == sum(len(idx) for idx, _ in fake.calls)


def test_each_round_decodes_every_open_image_once_with_mixed_ks():
    ladder = [1, 2, 4, 8, 16, 32]
    table = np.array([[30.0] * 6, [0, 0, 0, 0, 0, 30.0], [0, 0, 30.0, 30, 30, 30]])
    fake = FakeDecoder(table, ladder)
    bisect_ladder(3, ladder, Criterion("psnr", 20), fake)
    first_idx, first_ks = fake.calls[0]
    assert first_idx == [0, 1, 2] and first_ks == [8, 8, 8]
    assert any(len(set(ks)) > 1 for _, ks in fake.calls[1:])  # images diverge: one call, several k's
    for idx, _ in fake.calls:
        assert len(idx) == len(set(idx))


def test_an_image_that_never_meets_the_target_keeps_the_largest_k_and_is_counted():
    ladder = [1, 2, 4, 8]
    table = np.array([[5.0, 6, 7, 8], [5.0, 6, 25, 26]])
    result = bisect_ladder(2, ladder, Criterion("psnr", 20), FakeDecoder(table, ladder))
    assert result.k.tolist() == [8, 4]
    assert result.missed.tolist() == [True, False]
    assert result.score.tolist() == [8.0, 25.0]  # the chosen k was decoded


def test_inception_distance_meets_from_below():
    ladder = [1, 2, 4]
    table = np.array([[0.5, 0.2, 0.05], [0.08, 0.04, 0.01]])
    result = bisect_ladder(2, ladder, Criterion("inception", 0.1), FakeDecoder(table, ladder))
    assert result.k.tolist() == [4, 1]


def test_non_monotone_scores_still_give_a_k_that_was_decoded_and_met():
    rng = np.random.default_rng(1)
    ladder = [1, 2, 4, 8, 16, 32]
    table = rng.uniform(10, 30, size=(500, 6))  # no order at all
    crit = Criterion("psnr", 20)
    result = bisect_ladder(500, ladder, crit, FakeDecoder(table, ladder))
    cols = np.searchsorted(ladder, result.k)
    chosen = table[np.arange(500), cols]
    assert crit.meets(chosen[~result.missed]).all()
    assert np.array_equal(result.score, chosen)
    exhaustive_k, _ = smallest_meeting(table, ladder, crit)
    assert (result.k[~result.missed] >= exhaustive_k[~result.missed]).all()
    assert non_monotone(table, crit).mean() > 0.9 and not non_monotone(np.sort(table, axis=1), crit).any()


# ------------------------------------------------------------------------------------------ equal slope
def concave_table(rng: np.random.Generator, n: int, ladder: list[int]) -> np.ndarray:
    """PSNR-like scores whose gain per token falls along the ladder, at a per-image pace."""
    gains = np.sort(rng.exponential(1.0, size=(n, len(ladder))), axis=1)[:, ::-1] * rng.uniform(0.2, 3, (n, 1))
    widths = np.diff([0, *ladder])  # tokens added by each rung
    return 10 + np.cumsum(gains * widths, axis=1)


@pytest.mark.parametrize("ladder", [[1, 2], [1, 2, 4, 8, 16, 32], [1, 2, 4, 8, 16, 32, 64, 128, 256], [3, 5, 6, 11]])
@pytest.mark.parametrize("lam", [0.05, 0.3, 2.0])
def test_slope_search_maximises_psnr_minus_lambda_k_on_concave_curves(ladder, lam):
    table = concave_table(np.random.default_rng(len(ladder)), 300, ladder)
    result = bisect_slope(300, ladder, lam, FakeDecoder(table, ladder))
    np.testing.assert_array_equal(result.k, best_slope(table, ladder, lam))
    assert not result.missed.any()  # a slope has no level to miss


@pytest.mark.parametrize("rungs, within_issue_bound", [(2, True), (6, True), (9, True), (8, False), (32, False)])
def test_slope_search_decodes_each_rung_once_within_its_bound(rungs, within_issue_bound):
    ladder = [2**i for i in range(rungs)] if rungs <= 9 else list(range(1, rungs + 1))
    fake = FakeDecoder(concave_table(np.random.default_rng(0), 400, ladder), ladder)
    result = bisect_slope(400, ladder, 0.3, fake)
    bound = max_decodes(rungs, Criterion("psnr-slope", 0.3))
    assert result.decodes.max() <= bound and len(fake.calls) <= bound  # one call per round for the whole batch
    assert result.decodes.sum() == sum(len(idx) for idx, _ in fake.calls)  # nothing decoded twice
    assert (bound <= int(np.ceil(np.log2(rungs))) + 1) == within_issue_bound
    for idx, ks in fake.calls:  # at most the two rungs of one gap per image and round
        assert max(np.bincount(idx)) <= 2 and len(set(zip(idx, ks, strict=True))) == len(idx)


def test_slope_search_on_any_curve_stops_where_the_gain_fell_below_lambda():
    rng = np.random.default_rng(2)
    ladder = [1, 2, 4, 8, 16, 32]
    table = rng.uniform(10, 30, size=(500, 6))  # no order at all
    lam = 0.2
    result = bisect_slope(500, ladder, lam, FakeDecoder(table, ladder))
    for tried, k in zip(result.tried, result.k, strict=True):
        j = ladder.index(int(k))
        assert k in tried  # the chosen rung was decoded
        if j + 1 < len(ladder):  # the gain after it was measured and is below lambda
            assert (tried[ladder[j + 1]] - tried[k]) / (ladder[j + 1] - k) < lam
        if j > 0:  # the gain into it was measured and is not
            assert (tried[k] - tried[ladder[j - 1]]) / (k - ladder[j - 1]) >= lam


def test_search_ladder_picks_the_search_by_criterion():
    ladder = [1, 2, 4, 8]
    table = np.array([[10.0, 14, 15, 15.5]])  # gains per token 4, 0.5, 0.125
    assert search_ladder(1, ladder, Criterion("psnr", 14.5), FakeDecoder(table, ladder)).k.tolist() == [4]
    assert search_ladder(1, ladder, Criterion("psnr-slope", 1.0), FakeDecoder(table, ladder)).k.tolist() == [2]
    assert search_ladder(1, ladder, Criterion("psnr-slope", 0.1), FakeDecoder(table, ladder)).k.tolist() == [8]
    with pytest.raises(ValueError, match="gain"):
        Criterion("psnr-slope", 1.0).meets(table)


# ------------------------------------------------------------------------------------------ with a model
@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, size=(6, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
    return smooth.astype(np.uint8)  # [6, 32, 32, 3]


def test_search_on_the_tiny_model_is_one_mixed_decode_call_per_round(tiny_model, photos, monkeypatch):
    calls = []
    real = tiny_model.detokenize

    def counting(tokens, **kw):
        calls.append(sorted(len(t) for t in tokens))
        return real(tokens, **kw)

    monkeypatch.setattr(tiny_model, "detokenize", counting)
    dec = Decoding(timesteps=2)
    ladder = [1, 2, 4, 8, 16, 32]
    _, result = search_lengths(tiny_model, photos, Criterion("psnr", 0.0), ladder, PSNRScorer(), dec=dec)
    assert result.k.tolist() == [1] * 6 and len(calls) == max_decodes(6)  # every image meets: k=1 after 3 rounds
    calls.clear()
    _, result = search_lengths(tiny_model, photos, Criterion("psnr", 100.0), ladder, PSNRScorer(), dec=dec)
    assert result.missed.all() and result.k.tolist() == [32] * 6
    assert calls == [[8] * 6, [32] * 6]  # misses at the middle rung, then at the last: 2 rounds


def test_search_scores_match_decoding_each_prefix_alone_from_the_image_noise(tiny_model, photos):
    dec = Decoding(timesteps=2)
    ladder = [1, 4, 16, 32]
    seeds = [10, 11, 12, 13, 14, 15]
    tokens, result = search_lengths(tiny_model, photos, Criterion("psnr", 9.0), ladder, PSNRScorer(), seeds, dec)
    noise = image_noise(tiny_model, seeds)
    for i in (0, 3):
        for k, score in result.tried[i].items():
            alone = decode_prefixes(tiny_model, tokens, np.array([i]), np.array([k]), noise, dec)
            assert PSNRScorer()(photos[i : i + 1], alone)[0] == pytest.approx(score, abs=1e-3)
    assert torch.equal(noise[2], image_noise(tiny_model, [12])[0])
