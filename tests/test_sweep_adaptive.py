"""Adaptive targets in the reconstruction sweep (pipeline.eval.sweep_adaptive): the k each image gets is the
live search's, replayed on the sweep's table of decoded k's; its rows join one more group, with bounded state."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.adaptive import Criterion, Decoding, PSNRScorer, bisect_ladder, search_lengths, smallest_meeting
from pipeline.eval import sweep as S
from pipeline.eval import sweep_results as SR
from pipeline.eval.fid import FeatureStats
from pipeline.eval.sweep_adaptive import AdaptivePlan, check_ladder, choose, parse_targets, score_table
from pipeline.inception import FEATURE_DIM

LADDER = (1, 2, 4, 8, 16, 32)


def test_choice_replays_the_bisection_not_the_exhaustive_scan():
    """On a table where quality dips, the choice is bisection's (what the live search returns, with its decoder
    calls counted), which here is not the smallest k that meets the target."""
    scores = np.array([[10.0, 15.0, 11.0, 12.0, 16.0, 17.0], [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]])
    crit = Criterion("psnr", 14.5)
    calls = np.zeros(2, int)

    def live(idx, ks):
        np.add.at(calls, idx, 1)
        return scores[idx, [LADDER.index(int(k)) for k in ks]]

    live_result = bisect_ladder(2, list(LADDER), crit, live)
    replay = choose(scores, LADDER, crit)
    np.testing.assert_array_equal(replay.k, live_result.k)
    np.testing.assert_array_equal(replay.decodes, calls)
    np.testing.assert_array_equal(replay.missed, [False, False])
    assert replay.k.tolist() == [16, 32]
    assert smallest_meeting(scores, list(LADDER), crit)[0].tolist() == [2, 32]  # the scan would differ


def photos32(imagenet_sample, n: int) -> tuple[list[str], np.ndarray]:
    files = sorted(imagenet_sample.glob("*.JPEG"))[:n]
    images = [np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BICUBIC)) for f in files]
    return [f.name for f in files], np.stack(images)  # uint8 [n, 32, 32, 3]


def test_choice_is_what_the_live_search_picks_from_the_same_noise(tiny_model, imagenet_sample, tmp_path):
    """The sweep stage decodes every k (batches mixing k's); the live search (pretokenize --adaptive's) decodes
    only the rungs it needs, from the same per-image noise: same scores, same k's, same decoder-call counts."""
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    keys, images = photos32(imagenet_sample, 6)
    stage = S.ReconstructStage(str(folder), LADDER, {"timesteps": 2, "decode_batch": 7}, [], False)
    rows = stage({"key": np.array(keys, object), "image": images})
    chunk = {f"psnr_{k}": rows["psnr"][rows["k"] == k] for k in LADDER}  # [6] each, image order
    table = score_table(chunk, LADDER, Criterion("psnr", 0.0))  # [6, L]
    levels = np.unique(table)
    thresholds = [Criterion("psnr", float(t)) for t in (levels[len(levels) // 4], levels[len(levels) // 2])]
    slopes = [Criterion("psnr-slope", lam) for lam in (0.05, 0.5)]
    for crit in [*thresholds, Criterion("psnr", float(levels[-1] - 1e-6)), *slopes]:
        seeds = [S.noise_seed(0, key) for key in keys]
        _, live = search_lengths(tiny_model, images, crit, list(LADDER), PSNRScorer(), seeds, Decoding(timesteps=2))
        replay = choose(table, LADDER, crit)
        np.testing.assert_array_equal(replay.k, live.k)
        np.testing.assert_array_equal(replay.missed, live.missed)
        np.testing.assert_array_equal(replay.decodes, live.decodes)
        for i, tried in enumerate(live.tried):
            for k, score in tried.items():
                assert table[i, LADDER.index(k)] == pytest.approx(score, abs=1e-9)


def chunked_images(n: int, start: int = 0, ladder: tuple[int, ...] = LADDER) -> list[SR.ImageResult]:
    """n finished images whose PSNR rises with k at a per-image pace; features seeded by (image, k)."""
    out = []
    for i in range(start, start + n):
        r = SR.ImageResult(f"img-{i:05d}", 0, encode_calls=1, decode_calls=len(ladder))
        for j, k in enumerate((S.REAL, *ladder)):
            f = np.random.default_rng(i * 100 + k).random(FEATURE_DIM).astype(np.float32)
            psnr = 10.0 + (j * (1 + i % 3)) % 9 if k else np.nan
            r.rows[k] = {"features": f, "logits": None, "png": b"", "mse": 1.0, "psnr": psnr, "ssim": 0.5}
        out.append(r)
    return out


def partial_with(url: str, n: int, chunk: int, ladder: tuple[int, ...] = LADDER) -> SR.PartialResults:
    partial = SR.PartialResults(url, {"test": n}, (S.REAL, *ladder))
    partial.open()
    for start in range(0, n, chunk):
        partial.write(chunked_images(min(chunk, n - start), start, ladder), has_logits=False)
    return partial


def test_each_target_is_one_more_group_of_the_chosen_rows():
    plan = AdaptivePlan(parse_targets("psnr:13,psnr:16.5"), LADDER)
    g = SR.gather(partial_with("memory://adaptive/a", 20, chunk=6), adaptive=plan)
    images = chunked_images(20)
    for group, crit in plan.groups:
        table = np.array([[r.rows[k]["psnr"] for k in LADDER] for r in images])
        expected = choose(table, LADDER, crit)
        rows = [r.rows[int(k)] for r, k in zip(images, expected.k, strict=True)]
        stats = FeatureStats.of(np.stack([x["features"] for x in rows]).astype(np.float64))
        np.testing.assert_allclose(g.per_k[group].stats.mu, stats.mu, rtol=1e-6)
        assert g.per_k[group].pixel_mean("psnr") == pytest.approx(np.mean([x["psnr"] for x in rows]))
        tally = g.adaptive[group].summary(LADDER)
        assert tally["mean_tokens"] == pytest.approx(expected.k.mean())
        assert tally["missed"] == expected.missed.sum() and tally["images"] == 20
        assert tally["decodes_if_searched"]["max"] == expected.decodes.max() <= tally["decodes_if_searched"]["bound"]
        assert sum(tally["k_histogram"].values()) == 20
    assert g.adaptive[plan.group(0)].tokens < g.adaptive[plan.group(1)].tokens  # a higher target costs more


def test_inception_targets_compare_features_with_the_originals():
    chunk = {f"features_{S.REAL}": np.array([[1.0, 0.0], [0.0, 2.0]])}
    chunk |= {"features_1": np.array([[0.0, 1.0], [0.0, 1.0]]), "features_2": np.array([[3.0, 0.0], [1.0, 1.0]])}
    table = score_table(chunk, (1, 2), Criterion("inception", 0.1))
    np.testing.assert_allclose(table, [[1.0, 0.0], [0.0, 1 - np.sqrt(0.5)]])


def test_adaptive_state_does_not_grow_with_the_number_of_images():
    ladder = (1, 32)  # few groups: each chunk folds a 2048 x 2048 outer product into every group
    plan = AdaptivePlan(parse_targets("psnr:13"), ladder)
    small = SR.gather(partial_with("memory://adaptive/small", 6, 3, ladder), subset_size=3, adaptive=plan)
    large = SR.gather(partial_with("memory://adaptive/large", 18, 3, ladder), subset_size=3, adaptive=plan)
    group = small.per_k[plan.group(0)], large.per_k[plan.group(0)]
    assert group[1].stats.n == 18 and len(group[1].subset.features) == len(group[0].subset.features) == 3
    assert group[0].subset.nbytes == group[1].subset.nbytes
    assert large.adaptive[plan.group(0)].images == 18 and len(large.adaptive[plan.group(0)].histogram) <= 2


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "expected CRITERION:TARGET"), ("psnr:14,psnr:14", "repeated"), ("ssim:0.5", "CRITERION one of"),
     ("psnr:x", "not a number")],
)  # fmt: skip
def test_bad_targets_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_targets(text)
    assert "\n" not in str(e.value)


def test_the_ladder_must_be_decoded_by_the_sweep():
    assert check_ladder([1, 4], (1, 2, 4)) == (1, 4)
    with pytest.raises(ValueError, match=r"k=\[8\] not among the sweep's k's \[1, 2, 4\]"):
        check_ladder([1, 8], (1, 2, 4))
