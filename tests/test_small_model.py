"""The shipped small tokenizer (models/flextok-small) on photos it never trained on: quality rises with k and
the full sequence beats the 2x2 thumbnail, which holds about as many bits as 6 tokens (issue 11's floor)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from flextok import FlexTok

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "flextok-small"


def small_model_bench():
    spec = importlib.util.spec_from_file_location("small_model", REPO / "bench" / "small_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def heldout_psnr(imagenet_sample):
    """Mean PSNR per k on 32 held-out photos (25 decoder steps, the same noise for every k of a photo), and
    of their 2x2 thumbnails."""
    from pipeline.image_metrics import pixel_metrics

    bench = small_model_bench()
    model = FlexTok.from_pretrained(SHIPPED).float().eval()
    photos = bench.load_photos(imagenet_sample, SHIPPED / "heldout.csv", model.cfg.image_size, limit=32)
    ks = [1, 2, 4, 8, 16, 32]
    recon = bench.reconstructions(model, photos, ks, timesteps=25, seed=0)
    psnr = {k: float(pixel_metrics(photos, recon[k])[1].mean()) for k in ks}
    thumb = float(pixel_metrics(photos, bench.thumbnail(photos, 2))[1].mean())
    return psnr, thumb


def test_heldout_photos_are_not_training_photos():
    train = set((SHIPPED / "train.csv").read_text().splitlines()[1:])
    heldout = set((SHIPPED / "heldout.csv").read_text().splitlines()[1:])
    assert len(heldout) == 50 and len(train) == 200 and not train & heldout


def test_psnr_rises_with_k(heldout_psnr):
    psnr, _ = heldout_psnr
    values = [psnr[k] for k in sorted(psnr)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), psnr
    assert values[-1] - values[0] > 3.0, psnr  # the last tokens add detail, not noise


def test_all_tokens_beat_the_2x2_thumbnail(heldout_psnr):
    psnr, thumb = heldout_psnr
    assert psnr[32] > thumb, (psnr, thumb)
