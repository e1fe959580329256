"""Tokenizer training: the FlexTok objective (rectified flow with nested dropout and null-condition dropout,
from `FlexTok.loss`) plus the optional REPA term, fed with images from Ray Data.

    ds = image_dataset(["shards/*.tar"], resolution=256)          # pipeline.data.sources, as pretokenize reads
    task = TokenizerTask(model=preset("d18_d28").to_dict(), repa_weight=1.0, teacher=TeacherSpec("dinov2", ...))
    run_training(task, LoopConfig(...), training_images(ds), Scaling(8, gpus_per_worker=1), Run("s3://bucket/runs/tok"))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn
from torch import Tensor, nn

from flextok import FlexTok, FlexTokConfig
from flextok.checkpoint import load_state_dict_strict

from ..data.preprocess import to_model_input
from .common import LoopConfig
from .loop import TrainTask
from .repa import Projector, TeacherSpec, build_teacher, repa_loss


class TokenizerObjective(nn.Module):
    """FlexTok (`.model`) and, with REPA, the projector from the decoder's `repa_layer` to the teacher."""

    def __init__(
        self, cfg: FlexTokConfig, teacher_dim: int | None = None, repa_weight: float = 0.0, repa_hidden: int = 2048
    ):
        super().__init__()
        self.model = FlexTok(cfg)
        self.repa_weight = repa_weight
        self.projector = Projector(cfg.decoder.dim, teacher_dim, repa_hidden) if teacher_dim else None

    def forward(
        self, images: Tensor, teacher: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """images [B, 3, H, W] in [-1, 1]; teacher: patch features [B, P', Dt] when REPA is on."""
        out = self.model.loss(images, generator=generator, return_repa=self.projector is not None)
        result = {"loss": out["loss"], "flow": out["loss"].detach(), "keep_k": out["keep_k"].float().mean()}
        if self.projector is not None:
            repa = repa_loss(self.projector(out["repa"]), teacher)
            result["loss"] = out["loss"] + self.repa_weight * repa
            result["repa"] = repa.detach()
        return result


class ImageCollate(ArrowBatchCollateFn):
    """Arrow rows with an `image` column (uint8 [R, R, 3] tensors) -> {"images": float [B, 3, R, R] in [-1, 1]}."""

    def __call__(self, batch: pa.Table) -> dict[str, Tensor]:
        images = batch.column("image").combine_chunks().to_numpy()  # [B, R, R, 3] uint8
        return {"images": to_model_input(np.ascontiguousarray(images))}


@dataclass
class TokenizerTask(TrainTask):
    model: dict[str, Any]  # FlexTokConfig.to_dict()
    hflip: bool = True  # random horizontal flips (drawn from the step's generator)
    repa_weight: float = 0.0  # 0: no REPA
    repa_hidden: int = 2048  # projector MLP width (REPA's)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    vae_weights: str | None = None  # kind="kl": AutoencoderKL safetensors (frozen); "pixel" needs none
    init: str | None = None  # start from this FlexTok checkpoint (ours or official) instead of random weights

    unit = "images"

    def __post_init__(self) -> None:
        self._teacher: nn.Module | None = None

    @property
    def config(self) -> FlexTokConfig:
        return FlexTokConfig.from_dict(self.model)

    def build(self) -> nn.Module:
        if self.repa_weight > 0:
            self._teacher = build_teacher(self.teacher)
        teacher_dim = int(self._teacher.dim) if self._teacher is not None else None
        objective = TokenizerObjective(self.config, teacher_dim, self.repa_weight, self.repa_hidden)
        if self.init:
            load_state_dict_strict(objective.model, FlexTok.from_pretrained(self.init).state_dict())
        if self.vae_weights:
            load_vae_weights(objective.model, self.vae_weights)
        return objective

    def setup(self, device: torch.device) -> None:
        if self._teacher is not None:
            self._teacher = self._teacher.to(device)

    def new_model(self) -> FlexTok:
        return FlexTok(self.config)

    def batches(self, shard: Any, epoch: int, micro_batch: int, cfg: LoopConfig) -> Iterator[dict[str, Tensor]]:
        return shard.iter_torch_batches(
            batch_size=micro_batch,
            drop_last=True,
            collate_fn=ImageCollate(),
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch if cfg.shuffle_buffer else None,
        )

    def inputs(self, batch: dict[str, Tensor], device: torch.device, generator: torch.Generator) -> dict[str, Any]:
        images = batch["images"]
        if self.hflip:
            flip = torch.rand(images.shape[0], generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        images = images.to(device)
        if self._teacher is None:
            return {"images": images}
        return {"images": images, "teacher": self._teacher(images)}

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["images"].shape[0])


def load_vae_weights(model: FlexTok, path: str) -> None:
    """Frozen AutoencoderKL weights from a diffusers folder (diffusion_pytorch_model.safetensors) or a
    .safetensors file, e.g. EPFL-VILAB/flextok_vae_c16 downloaded beforehand."""
    from safetensors.torch import load_file

    if model.vae.autoencoder is None:
        raise ValueError("vae-weights given, but this model uses pixel latents (no VAE to load)")
    p = Path(path)
    file = p / "diffusion_pytorch_model.safetensors" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"VAE weights not found: {file}")
    load_state_dict_strict(model.vae.autoencoder, load_file(str(file)))


def training_images(ds: Any, materialize: bool = False) -> Any:
    """image_dataset rows -> the good rows' `image` column (bad records were recorded by the source and
    are left out); `materialize` keeps the decoded images in the object store across epochs (small data)."""
    from ..data.sources import good_rows

    ds = good_rows(ds).select_columns(["image"])
    return ds.materialize() if materialize else ds
