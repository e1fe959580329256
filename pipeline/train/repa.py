"""REPA (Yu et al., 2024, arXiv 2410.06940) for tokenizer training: align a projection of an intermediate
decoder layer's patch tokens with a frozen teacher's patch features, by cosine similarity.

    teacher = build_teacher(TeacherSpec(kind="dinov2", repo="~/dinov2", weights="dinov2_vitl14.pth"))
    projector = Projector(decoder_dim, teacher.dim)
    loss = repa_loss(projector(decoder_tokens), teacher(images))    # 1 - mean cosine similarity

The teacher is pluggable and never downloads anything: `dinov2` loads a local torch.hub checkout (its
hubconf.py) and local weights (weights_only); `random-conv` is a fixed, seeded random conv net that gives
patch features of any width, the stand-in for tests and CPU runs.

Security: `torch.hub.load(source="local")` imports and RUNS the checkout's hubconf.py (and what it imports).
Point `repo` only at a checkout you trust (e.g. your clone of facebookresearch/dinov2). We refuse a hubconf.py
that resolves outside the given folder (a symlink out of it) and an entry point that is not a plain name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TeacherSpec:
    kind: Literal["random-conv", "dinov2"] = "random-conv"
    repo: str | None = None  # dinov2: a local checkout of facebookresearch/dinov2 (holds hubconf.py)
    weights: str | None = None  # dinov2: a local state-dict file (.pth or .safetensors)
    model: str = "dinov2_vitl14"  # dinov2: the hub entry point
    input_size: int = 224  # dinov2: images are resized to this (a multiple of its patch size 14)
    dim: int = 64  # random-conv: feature width
    patch: int = 4  # random-conv: pixels per feature cell
    seed: int = 0  # random-conv: weight seed


class Projector(nn.Module):
    """REPA's MLP: decoder width -> hidden -> hidden -> teacher width, SiLU between."""

    def __init__(self, dim: int, teacher_dim: int, hidden: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, teacher_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def to_grid(features: Tensor, grid: int) -> Tensor:
    """Square patch features [B, G*G, D] -> [B, grid*grid, D] by area averaging (or nearest upsampling)."""
    B, P, D = features.shape
    G = math.isqrt(P)
    if G * G != P:
        raise ValueError(f"teacher features must come from a square grid, got {P} patches")
    if grid == G:
        return features
    x = features.transpose(1, 2).reshape(B, D, G, G)
    x = F.adaptive_avg_pool2d(x, grid) if grid < G else F.interpolate(x, size=grid, mode="nearest")
    return x.flatten(2).transpose(1, 2)


def repa_loss(projected: Tensor, target: Tensor) -> Tensor:
    """projected [B, P, Dt] (from the decoder), target [B, P', Dt] (teacher; any square grid) -> 1 - mean
    cosine similarity per patch (0 = aligned)."""
    target = to_grid(target.float(), math.isqrt(projected.shape[1]))
    return 1 - F.cosine_similarity(projected.float(), target, dim=-1).mean()


class RandomConvTeacher(nn.Module):
    """A fixed random conv net: images [B, 3, H, W] in [-1, 1] -> patch features [B, (H/p)^2, dim]."""

    def __init__(self, dim: int = 64, patch: int = 4, seed: int = 0):
        super().__init__()
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=patch, stride=patch)
        self.conv2 = nn.Conv2d(64, dim, kernel_size=3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(fan_in))
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = self.conv2(F.gelu(self.conv1(images)))  # [B, dim, H/p, W/p]
        return x.flatten(2).transpose(1, 2)


class DINOv2Teacher(nn.Module):
    """DINOv2 from a local torch.hub checkout and local weights: images in [-1, 1] -> normalized patch
    tokens [B, (input_size/14)^2, D]."""

    def __init__(self, repo: str, weights: str, model: str = "dinov2_vitl14", input_size: int = 224):
        super().__init__()
        repo_dir, weights_path = Path(repo).expanduser(), Path(weights).expanduser()
        hubconf = repo_dir / "hubconf.py"
        if not hubconf.is_file():
            raise FileNotFoundError(f"REPA teacher: {repo_dir} is not a torch.hub checkout (no hubconf.py)")
        if not hubconf.resolve().is_relative_to(repo_dir.resolve()):
            raise ValueError(f"REPA teacher: {hubconf} resolves to {hubconf.resolve()}, outside {repo_dir}; refused")
        if not model.isidentifier():
            raise ValueError(f"REPA teacher: entry point {model!r} is not a plain name")
        if not weights_path.is_file():
            raise FileNotFoundError(f"REPA teacher: weights file {weights_path} not found")
        self.net = torch.hub.load(str(repo_dir), model, source="local", pretrained=False)  # runs hubconf.py
        if weights_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights_path))
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.dim = int(self.net.embed_dim)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DINOv2Teacher:
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
        x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        return self.net.forward_features(x)["x_norm_patchtokens"]


def build_teacher(spec: TeacherSpec) -> nn.Module:
    """A frozen teacher with attribute `dim`."""
    if spec.kind == "random-conv":
        return RandomConvTeacher(spec.dim, spec.patch, spec.seed)
    if spec.kind == "dinov2":
        if not spec.repo or not spec.weights:
            raise ValueError("REPA teacher dinov2 needs a local hub checkout (repa-teacher-repo) and weights file")
        return DINOv2Teacher(spec.repo, spec.weights, spec.model, spec.input_size)
    raise ValueError(f"unknown REPA teacher '{spec.kind}' (random-conv | dinov2)")
