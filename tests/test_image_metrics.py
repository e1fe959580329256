"""SSIM against an independent implementation: scikit-image's structural_similarity (a test-only dependency)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from pipeline.image_metrics import pixel_metrics


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image with our variant spelled out: Gaussian window sigma 1.5 (11 taps: truncate 3.5), population
    (not sample) covariances, K1 0.01, K2 0.03, range 255, per channel then averaged; the mean is taken over
    the pixels whose window lies inside the image (skimage crops (11 - 1) / 2 pixels), as ours."""
    return structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        K1=0.01,
        K2=0.03,
        data_range=255,
        channel_axis=-1,
    )


def image_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Noise vs noise, a smooth image vs its noisy copy, and vs a shifted copy, at 32 and 48 px (not square)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:32, 0:48]
    smooth = np.stack([128 + 100 * np.sin(x / 5.0 + c) * np.cos(y / 7.0) for c in range(3)], -1)
    smooth = smooth.astype(np.uint8)
    noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    noise_a = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    noise_b = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    return [(noise_a, noise_b), (smooth, noisy), (smooth, np.roll(smooth, 3, axis=1)), (smooth, smooth)]


@pytest.mark.parametrize("pair", range(4))
def test_ssim_equals_scikit_image(pair):
    a, b = image_pairs()[pair]
    _, _, ours = pixel_metrics(a[None], b[None])
    assert ours[0] == pytest.approx(skimage_ssim(a, b), abs=1e-4)


def test_ssim_in_a_batch_equals_each_image_alone():
    pairs = image_pairs()
    a = np.stack([p[0] for p in pairs])
    b = np.stack([p[1] for p in pairs])
    _, _, batch = pixel_metrics(a, b)
    np.testing.assert_allclose(batch, [skimage_ssim(x, y) for x, y in pairs], atol=1e-4)
