"""Euler sampling of the rectified flow, with classifier-free guidance (CFG) or adaptive projected
guidance (APG, Sadat et al. 2024, arXiv 2410.02416) exactly as the FlexTok release applies them.

Flow convention: x_t = t * noise + (1 - t) * x_0, t = 1 is noise, the model predicts v = noise - x_0,
and the sampler steps x <- x - dt * v at t = T/T, (T-1)/T, ..., 1/T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# velocity_fn(x_t [B,C,h,w], t [B], with_uncond) -> v [B,C,h,w], or [2B,C,h,w] = [cond; uncond]
# (one batched pass) when with_uncond is True
VelocityFn = Callable[[Tensor, Tensor, bool], Tensor]


@dataclass
class Guidance:
    scale: float = 1.0  # 1.0: no guidance, no unconditional pass
    apg: bool = False  # False: plain CFG
    momentum: float = -0.5  # APG running-average momentum (negative in the release)
    norm_threshold: float = 2.5  # APG clip of the guidance update's L2 norm, per image
    eta: float = 0.0  # APG weight of the parallel component

    @property
    def active(self) -> bool:
        return self.scale != 1.0


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def apg_velocity(v_cond: Tensor, v_uncond: Tensor, g: Guidance, running: Tensor | None) -> tuple[Tensor, Tensor]:
    """One APG step per image; returns (guided velocity, new running average of the update)."""
    diff = v_cond - v_uncond
    running = diff if running is None else diff + g.momentum * running
    dims = tuple(range(1, diff.ndim))
    update = running
    if g.norm_threshold > 0:
        norm = update.norm(p=2, dim=dims, keepdim=True)
        update = update * torch.minimum(torch.ones_like(update), g.norm_threshold / norm)
    # split the update into parts parallel and orthogonal to v_cond, in float64 as the release does
    u = F.normalize(v_cond.double().flatten(1), dim=1).view_as(v_cond)
    upd = update.double()
    parallel = (upd * u).sum(dim=dims, keepdim=True) * u
    orthogonal = (upd - parallel).to(v_cond.dtype)
    guided = v_cond + (g.scale - 1) * (orthogonal + g.eta * parallel.to(v_cond.dtype))
    return guided, running


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: Tensor, timesteps: int, guidance: Guidance) -> Tensor:
    """Integrate from t = 1 (x = noise) to t = 0; returns x_0 [B, C, h, w]."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    x = noise
    dt = 1.0 / timesteps
    running = None
    for i in range(timesteps, 0, -1):
        t = torch.full((x.shape[0],), i / timesteps, device=x.device, dtype=torch.float32)
        if not guidance.active:
            v = velocity_fn(x, t, False)
        else:
            v_cond, v_uncond = velocity_fn(x, t, True).chunk(2)
            if guidance.apg:
                v, running = apg_velocity(v_cond, v_uncond, guidance, running)
            else:
                v = cfg_velocity(v_cond, v_uncond, guidance.scale)
        x = x - dt * v.float()
    return x
