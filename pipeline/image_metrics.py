"""Per-image reconstruction metrics on uint8 images: MSE, PSNR and SSIM (no learned network).

    mse, psnr, ssim = pixel_metrics(original, recon)      # uint8 [B, H, W, 3] each -> float64 [B] each

MSE is over [0, 255] pixel values; PSNR = 10 log10(255^2 / MSE), capped at 100 dB for identical images;
SSIM (Wang et al. 2004) uses an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, the valid region
only, averaged over the three channels (as pytorch-msssim). That is scikit-image's structural_similarity with
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1 (equal to 1e-15;
tests/test_image_metrics.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAX_PSNR = 100.0


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """float [B, 3, H, W] (same range) -> SSIM [B]; images smaller than the window use a window of their size."""
    size = min(11, a.shape[-1], a.shape[-2])
    g = _gaussian_window(size).to(a)
    C = a.shape[1]
    wx = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)  # separable: along width, then height
    wy = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, wx, groups=C), wy, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def pixel_metrics(original: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [B, H, W, 3] pairs -> (mse, psnr, ssim), each float64 [B]."""
    if original.shape != recon.shape or original.dtype != np.uint8 or recon.dtype != np.uint8:
        raise ValueError(
            f"need two uint8 arrays of one shape, got {original.dtype}{original.shape}, {recon.dtype}{recon.shape}"
        )
    a = torch.from_numpy(original).permute(0, 3, 1, 2).double()  # [B, 3, H, W]
    b = torch.from_numpy(recon).permute(0, 3, 1, 2).double()
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    psnr = torch.where(mse > 0, 10 * torch.log10(255.0**2 / mse.clamp_min(1e-30)), torch.full_like(mse, MAX_PSNR))
    return mse.numpy(), psnr.clamp_max(MAX_PSNR).numpy(), ssim(a, b).numpy()
