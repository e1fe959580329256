"""Checkpoints: our own format, and import/export of the official FlexTok hub format.

Our format, a folder:
    config.json         {"format": "flextok-pipeline", "version": 1, "config": FlexTokConfig.to_dict()}
    model.safetensors   our parameter names, VAE included (vae.autoencoder.*)

Official format (apple/ml-flextok, EPFL-VILAB/flextok_*), a folder or hub id:
    config.json         hydra-style: nested dicts with `_target_` class paths
    model.safetensors   official parameter names (same config in the header metadata as Python literals)
    vae/config.json     (fixture-style) or a hub id in `vae.hf_hub_path` for the AutoencoderKL config

Nothing here instantiates a `_target_` or evaluates a string: the hydra config is *read* against an
explicit allowlist (every target, and every setting of each target, must be known) and translated into
our dataclasses. Tensors load with safetensors only.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import SD_VAE_ARCH, DecoderConfig, EncoderConfig, FlexTokConfig, VAEConfig

FORMAT = "flextok-pipeline"
FORMAT_VERSION = 1
OFFICIAL_ROOT = "flextok.flextok_wrapper.FlexTok"

# ---------------------------------------------------------------------------------------------------
# The official hydra config: allowlist of targets, and the settings of each that we understand.
# Keys ending in _key/_keys are data-dict plumbing and carry no model semantics; they are accepted.
# A setting that is listed with a fixed value must have exactly that value (we implement only it).
# ---------------------------------------------------------------------------------------------------
ANY = object()
P = "flextok.model."
OFFICIAL_TARGETS: dict[str, dict[str, Any]] = {
    OFFICIAL_ROOT: {},
    "flextok.vae_wrapper.StableDiffusionVAE": {
        "latent_channels": ANY,
        "scaling_factor": ANY,
        "hf_hub_path": ANY,
        "sample_posterior": ANY,
        "frozen": True,
        "dtype_override": ANY,
        "learnable_logvar": False,
        "compile_encode_fn": ANY,
        "force_vae_encode": ANY,
        "logvar_init": ANY,
    },
    P + "utils.wrappers.SequentialModuleDictWrapper": {"module_dict": ANY},
    P + "utils.dict_ops.PerSampleOp": {"per_sample_op": ANY},
    P + "utils.dict_ops.channels_first_to_last": {},
    P + "utils.dict_ops.channels_last_to_first": {},
    P + "preprocessors.patching.PatchEmbedder": {
        "channels_in": ANY,
        "dim": ANY,
        "patch_sizes": ANY,
        "flatten_patches": False,
    },
    P + "utils.posembs.PositionalEmbeddingAdder": {
        "dim": ANY,
        "max_sizes": ANY,
        "posemb_type": ANY,
        "posemb_scaling": "absolute",
    },
    P + "preprocessors.registers.Registers1D": {
        "dim": ANY,
        "n_min": ANY,
        "n_max": ANY,
        "size_sampling_mode": ANY,
        "ordering_mode": "nested",
    },
    P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker": {
        "mask_mode": ANY,
        "pad_to_multiple": ANY,
        "per_subseq_embs": ANY,
    },
    P + "trunks.transformers.FlexTransformer": {
        "dim": ANY,
        "depth": ANY,
        "head_dim": ANY,
        "mlp_ratio": ANY,
        "qkv_bias": False,
        "proj_bias": False,
        "mlp_bias": False,
        "qk_norm": True,
        "use_act_checkpoint": ANY,
        "drop_path_rate": ANY,
        "intermediate_layers": ANY,
        "adaLN_expansion": ANY,
        "gated_mlp": True,
    },
    P + "postprocessors.seq_unpacking.SequenceUnpacker": {},
    P + "postprocessors.heads.LinearHead": {
        "dim": ANY,
        "dim_out": ANY,
        "use_mup_readout": False,
        "weight_init_style": ANY,
    },
    P + "postprocessors.heads.ToPatchesLinearHead": {
        "dim": ANY,
        "channels_out": ANY,
        "patch_sizes": ANY,
        "use_mup_readout": False,
        "weight_init_style": ANY,
    },
    "flextok.regularizers.quantize_fsq.FSQ": {
        "levels": ANY,
        "drop_quant_p": ANY,
        "corrupt_tokens_p": ANY,
        "min_corrupt_tokens_p": ANY,
        "apply_corrupt_tokens_p": ANY,
        "packed_call": ANY,
    },
    P + "preprocessors.linear.LinearLayer": {"dim_in": ANY, "dim": ANY},
    P + "preprocessors.token_dropout.MaskedNestedDropout": {"dim": ANY, "size_sampling_mode": ANY},
    P + "preprocessors.nullcond.LearnedNullCond": {"dim": ANY, "dropout_prob": ANY},
    P + "preprocessors.time_embedding.TimestepEmbedder": {
        "dim": ANY,
        "frequency_embedding_size": ANY,
        "max_timestep": ANY,
        "weight_init_style": ANY,
        "temb_as_tokens": False,
    },
    "flextok.flow_matching.noise_modules.MinRFNoiseModule": {"ln": ANY, "stratisfied": ANY, "mode_scale": ANY},
    "flextok.flow_matching.pipelines.MinRFPipeline": {"out_channels": ANY},
}

# The module_dict entries we read, by the role they play (their target is checked too).
ENCODER_MODULES = {
    "enc_channels_to_last": P + "utils.dict_ops.PerSampleOp",
    "enc_patch_emb": P + "preprocessors.patching.PatchEmbedder",
    "enc_posemb_module": P + "utils.posembs.PositionalEmbeddingAdder",
    "enc_register_module": P + "preprocessors.registers.Registers1D",
    "enc_seq_packer": P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker",
    "enc_transformer": P + "trunks.transformers.FlexTransformer",
    "enc_unpacker": P + "postprocessors.seq_unpacking.SequenceUnpacker",
    "enc_to_latents": P + "postprocessors.heads.LinearHead",
}
DECODER_MODULES = {
    "dec_from_latents": P + "preprocessors.linear.LinearLayer",
    "dec_registers_posemb_module": P + "utils.posembs.PositionalEmbeddingAdder",
    "dec_nested_dropout": P + "preprocessors.token_dropout.MaskedNestedDropout",
    "dec_latent_dropout": P + "preprocessors.nullcond.LearnedNullCond",
    "dec_noise_channels_to_last": P + "utils.dict_ops.PerSampleOp",
    "dec_noise_patch_emb": P + "preprocessors.patching.PatchEmbedder",
    "dec_patches_posemb_module": P + "utils.posembs.PositionalEmbeddingAdder",
    "dec_seq_packer": P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker",
    "dec_time_embedder": P + "preprocessors.time_embedding.TimestepEmbedder",
    "dec_transformer": P + "trunks.transformers.FlexTransformer",
    "dec_unpacker": P + "postprocessors.seq_unpacking.SequenceUnpacker",
    "dec_to_patches": P + "postprocessors.heads.ToPatchesLinearHead",
    "dec_channels_to_first": P + "utils.dict_ops.PerSampleOp",
}
TOP_LEVEL = {
    "vae": "flextok.vae_wrapper.StableDiffusionVAE",
    "encoder": P + "utils.wrappers.SequentialModuleDictWrapper",
    "regularizer": "flextok.regularizers.quantize_fsq.FSQ",
    "decoder": P + "utils.wrappers.SequentialModuleDictWrapper",
    "flow_matching_noise_module": "flextok.flow_matching.noise_modules.MinRFNoiseModule",
    "pipeline": "flextok.flow_matching.pipelines.MinRFPipeline",
}
# diffusers AutoencoderKL config keys we accept (architecture, plus bookkeeping keys diffusers writes).
VAE_ARCH_KEYS = {
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
}
VAE_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


class CheckpointError(ValueError):
    """A checkpoint or config that we refuse to load; the message names the offending key(s)."""


def validate_official_config(node: Any, path: str = "") -> None:
    """Walk the hydra tree; every `_target_` must be allowlisted and every setting known."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            validate_official_config(item, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if target is not None:
        if target not in OFFICIAL_TARGETS:
            raise CheckpointError(f"unknown config target at '{path}._target_': {target!r} is not on the allowlist")
        allowed = OFFICIAL_TARGETS[target]
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if (
                key in ("_target_", "_partial_")
                or key.endswith(("_key", "_keys"))
                or (target == OFFICIAL_ROOT and key in TOP_LEVEL)
            ):
                pass
            elif key not in allowed:
                raise CheckpointError(f"unknown config key '{where}' for {target}")
            elif allowed[key] is not ANY and value != allowed[key]:
                raise CheckpointError(f"unsupported value at '{where}': {value!r} (supported: {allowed[key]!r})")
            if isinstance(value, dict | list):
                validate_official_config(value, where)
    else:
        for key, value in node.items():
            validate_official_config(value, f"{path}.{key}" if path else key)


def _module(cfg: dict, section: str, name: str, expected: dict[str, str]) -> dict:
    modules = cfg[section].get("module_dict", {})
    unknown = [k for k in modules if k not in expected]
    if unknown:
        raise CheckpointError(f"unknown config key(s) {[f'{section}.module_dict.{k}' for k in unknown]}")
    if name not in modules:
        raise CheckpointError(f"config is missing '{section}.module_dict.{name}'")
    node = modules[name]
    if node.get("_target_") != expected[name]:
        raise CheckpointError(f"'{section}.module_dict.{name}._target_' must be {expected[name]}")
    return node


def _require(value: Any, expected: Any, where: str) -> None:
    if value != expected:
        raise CheckpointError(f"unsupported value at '{where}': {value!r} (this implementation supports {expected!r})")


def official_to_config(cfg: dict, vae_arch: dict | None) -> FlexTokConfig:
    """Translate a validated official hydra config into our dataclasses."""
    if cfg.get("_target_") != OFFICIAL_ROOT:
        raise CheckpointError(f"'_target_' must be {OFFICIAL_ROOT!r}, got {cfg.get('_target_')!r}")
    for key in cfg:
        if key != "_target_" and key not in TOP_LEVEL:
            raise CheckpointError(f"unknown config key '{key}'")
    for key, target in TOP_LEVEL.items():
        if key not in cfg:
            raise CheckpointError(f"config is missing '{key}'")
        if cfg[key].get("_target_") != target:
            raise CheckpointError(f"'{key}._target_' must be {target!r}, got {cfg[key].get('_target_')!r}")
    validate_official_config(cfg)

    enc = lambda name: _module(cfg, "encoder", name, ENCODER_MODULES)  # noqa: E731
    dec = lambda name: _module(cfg, "decoder", name, DECODER_MODULES)  # noqa: E731

    # VAE
    v = cfg["vae"]
    C = int(v.get("latent_channels", 16))
    arch = {k: val for k, val in (vae_arch or SD_VAE_ARCH).items() if k in VAE_ARCH_KEYS}
    arch.pop("latent_channels", None)
    downsample = 2 ** (len(arch["down_block_types"]) - 1)
    vae = VAEConfig(
        kind="kl",
        latent_channels=C,
        downsample=downsample,
        scaling_factor=v.get("scaling_factor"),
        sample_posterior=bool(v.get("sample_posterior", True)),
        arch=arch,
    )
    # encoder
    patch = enc("enc_patch_emb")
    _require(int(patch["channels_in"]), C, "encoder.module_dict.enc_patch_emb.channels_in")
    p = list(patch["patch_sizes"])
    _require(p[0], p[1], "encoder.module_dict.enc_patch_emb.patch_sizes (square)")
    posemb = enc("enc_posemb_module")
    _require(posemb["posemb_type"], "sincos", "encoder.module_dict.enc_posemb_module.posemb_type")
    grid = list(posemb["max_sizes"])
    _require(grid[0], grid[1], "encoder.module_dict.enc_posemb_module.max_sizes (square)")
    regs = enc("enc_register_module")
    _require(enc("enc_seq_packer")["mask_mode"], "causal_last", "encoder.module_dict.enc_seq_packer.mask_mode")
    et = enc("enc_transformer")
    _require(et.get("adaLN_expansion"), None, "encoder.module_dict.enc_transformer.adaLN_expansion")
    for name in ("enc_channels_to_last", "enc_unpacker", "enc_to_latents"):
        enc(name)
    levels = tuple(int(x) for x in cfg["regularizer"]["levels"])
    _require(int(enc("enc_to_latents")["dim_out"]), len(levels), "encoder.module_dict.enc_to_latents.dim_out")
    encoder = EncoderConfig(
        dim=int(et["dim"]),
        depth=int(et["depth"]),
        head_dim=int(et.get("head_dim", 64)),
        mlp_ratio=float(et.get("mlp_ratio", 4.0)),
        num_registers=int(regs["n_max"]),
        patch_size=int(p[0]),
    )
    # decoder
    dt = dec("dec_transformer")
    _require(dt.get("adaLN_expansion"), 2, "decoder.module_dict.dec_transformer.adaLN_expansion")
    _require(dec("dec_seq_packer")["mask_mode"], "full", "decoder.module_dict.dec_seq_packer.mask_mode")
    _require(
        dec("dec_registers_posemb_module")["posemb_type"],
        "learnable_sum",
        "decoder...dec_registers_posemb_module.posemb_type",
    )
    _require(
        list(dec("dec_registers_posemb_module")["max_sizes"]),
        [encoder.num_registers],
        "decoder...dec_registers_posemb_module.max_sizes",
    )
    _require(
        dec("dec_patches_posemb_module")["posemb_type"], "sincos", "decoder...dec_patches_posemb_module.posemb_type"
    )
    _require(list(dec("dec_patches_posemb_module")["max_sizes"]), grid, "decoder...dec_patches_posemb_module.max_sizes")
    dpatch = dec("dec_noise_patch_emb")
    _require(list(dpatch["patch_sizes"]), p, "decoder.module_dict.dec_noise_patch_emb.patch_sizes")
    _require(int(dec("dec_from_latents")["dim_in"]), len(levels), "decoder.module_dict.dec_from_latents.dim_in")
    temb = dec("dec_time_embedder")
    _require(float(temb.get("max_timestep", 1000.0)), 1.0, "decoder.module_dict.dec_time_embedder.max_timestep")
    for name in (
        "dec_nested_dropout",
        "dec_latent_dropout",
        "dec_noise_channels_to_last",
        "dec_unpacker",
        "dec_to_patches",
        "dec_channels_to_first",
    ):
        dec(name)
    _require(int(dec("dec_to_patches")["channels_out"]), C, "decoder.module_dict.dec_to_patches.channels_out")
    repa = dt.get("intermediate_layers") or []
    mode = dec("dec_nested_dropout").get("size_sampling_mode", "uniform")
    decoder = DecoderConfig(
        dim=int(dt["dim"]),
        depth=int(dt["depth"]),
        head_dim=int(dt.get("head_dim", 64)),
        mlp_ratio=float(dt.get("mlp_ratio", 4.0)),
        patch_size=int(p[0]),
        time_freq_dim=int(temb.get("frequency_embedding_size", 256)),
        repa_layer=int(repa[0]) if repa else None,
        nested_dropout_mode="pow2" if mode == "pow2" else "uniform",
        null_cond_prob=float(dec("dec_latent_dropout").get("dropout_prob", 0.1)),
    )
    image_size = grid[0] * encoder.patch_size * downsample
    return FlexTokConfig(image_size=image_size, vae=vae, encoder=encoder, decoder=decoder, fsq_levels=levels)


def config_to_official(cfg: FlexTokConfig, hf_hub_path: str | None = "vae") -> dict:
    """Our config as an official hydra config (module order is execution order, as the release needs)."""
    if cfg.vae.kind != "kl":
        raise CheckpointError("the official format has no 'pixel' latents; only vae.kind='kl' models export")
    e, d, C = cfg.encoder, cfg.decoder, cfg.vae.latent_channels
    p, G, n, nl = [e.patch_size, e.patch_size], cfg.latent_size // e.patch_size, e.num_registers, len(cfg.fsq_levels)
    to_last = {"_target_": P + "utils.dict_ops.channels_first_to_last", "_partial_": True}
    to_first = {"_target_": P + "utils.dict_ops.channels_last_to_first", "_partial_": True}

    def t(name: str, **kw: Any) -> dict:
        return {"_target_": name, **kw}

    def non_default(**kw: Any) -> dict:  # settings the release leaves out when they have its default value
        defaults = {"mlp_ratio": 4.0, "frequency_embedding_size": 256}
        return {k: v for k, v in kw.items() if v != defaults[k]}

    encoder = {
        "enc_channels_to_last": t(
            P + "utils.dict_ops.PerSampleOp",
            read_key="vae_latents",
            write_key="vae_latents_bhwc",
            per_sample_op=to_last,
        ),
        "enc_patch_emb": t(
            P + "preprocessors.patching.PatchEmbedder",
            input_tensor_list_read_key="vae_latents_bhwc",
            patches_list_write_key="enc_patches",
            n_patches_write_key="enc_n_patches",
            channels_in=C,
            dim=e.dim,
            patch_sizes=p,
            flatten_patches=False,
        ),
        "enc_posemb_module": t(
            P + "utils.posembs.PositionalEmbeddingAdder",
            read_key="enc_patches",
            write_key="enc_patches",
            dim=e.dim,
            max_sizes=[G, G],
            posemb_type="sincos",
            posemb_scaling="absolute",
        ),
        "enc_register_module": t(
            P + "preprocessors.registers.Registers1D",
            input_tensor_list_read_key="enc_patches",
            register_sizes_read_write_key="register_sizes",
            registers_write_key="enc_registers",
            dim=e.dim,
            n_min=n,
            n_max=n,
            size_sampling_mode="uniform",
            ordering_mode="nested",
        ),
        "enc_seq_packer": t(
            P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker",
            input_list_read_keys=["enc_patches", "enc_registers"],
            packed_seq_write_key="enc_packed_seq",
            block_mask_write_key="enc_block_mask",
            inner_packed_shapes_write_key="enc_ps_inner",
            outer_packed_shapes_write_key="enc_ps_outer",
            mask_mode="causal_last",
            pad_to_multiple=128,
        ),
        "enc_transformer": t(
            P + "trunks.transformers.FlexTransformer",
            input_seq_read_key="enc_packed_seq",
            output_seq_write_key="enc_packed_seq",
            dim=e.dim,
            depth=e.depth,
            head_dim=e.head_dim,
            **non_default(mlp_ratio=e.mlp_ratio),
            block_mask_read_key="enc_block_mask",
        ),
        "enc_unpacker": t(
            P + "postprocessors.seq_unpacking.SequenceUnpacker",
            packed_seq_read_key="enc_packed_seq",
            inner_seq_write_keys=["enc_patches", "enc_registers"],
            inner_packed_shapes_read_key="enc_ps_inner",
            outer_packed_shapes_read_key="enc_ps_outer",
        ),
        "enc_to_latents": t(
            P + "postprocessors.heads.LinearHead",
            read_key="enc_registers",
            write_key="enc_registers",
            dim=e.dim,
            dim_out=nl,
            use_mup_readout=False,
            weight_init_style="zero",
        ),
    }
    decoder = {
        "dec_from_latents": t(
            P + "preprocessors.linear.LinearLayer",
            read_key="enc_registers_quant",
            write_key="dec_quants",
            dim_in=nl,
            dim=d.dim,
        ),
        "dec_registers_posemb_module": t(
            P + "utils.posembs.PositionalEmbeddingAdder",
            read_key="dec_quants",
            write_key="dec_quants",
            dim=d.dim,
            max_sizes=[n],
            posemb_type="learnable_sum",
            posemb_scaling="absolute",
        ),
        "dec_nested_dropout": t(
            P + "preprocessors.token_dropout.MaskedNestedDropout",
            read_write_key="dec_quants",
            dim=d.dim,
            size_sampling_mode=d.nested_dropout_mode,
        ),
        "dec_latent_dropout": t(
            P + "preprocessors.nullcond.LearnedNullCond",
            read_write_key="dec_quants",
            dim=d.dim,
            dropout_prob=d.null_cond_prob,
        ),
        "dec_noise_channels_to_last": t(
            P + "utils.dict_ops.PerSampleOp",
            read_key="vae_latents_noised",
            write_key="vae_latents_noised_bhwc",
            per_sample_op=to_last,
        ),
        "dec_noise_patch_emb": t(
            P + "preprocessors.patching.PatchEmbedder",
            input_tensor_list_read_key="vae_latents_noised_bhwc",
            patches_list_write_key="dec_patches",
            n_patches_write_key="dec_n_patches",
            channels_in=C,
            dim=d.dim,
            patch_sizes=p,
            flatten_patches=False,
        ),
        "dec_patches_posemb_module": t(
            P + "utils.posembs.PositionalEmbeddingAdder",
            read_key="dec_patches",
            write_key="dec_patches",
            dim=d.dim,
            max_sizes=[G, G],
            posemb_type="sincos",
            posemb_scaling="absolute",
        ),
        "dec_seq_packer": t(
            P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker",
            input_list_read_keys=["dec_patches", "dec_quants"],
            packed_seq_write_key="dec_packed_seq",
            block_mask_write_key="dec_block_mask",
            inner_packed_shapes_write_key="dec_ps_inner",
            outer_packed_shapes_write_key="dec_ps_outer",
            mask_mode="full",
            pad_to_multiple=128,
            emb_packing_fn_write_key="dec_emb_packing_fn",
            per_subseq_embs=True,
        ),
        "dec_time_embedder": t(
            P + "preprocessors.time_embedding.TimestepEmbedder",
            timesteps_read_key="timesteps",
            time_embedding_write_key="dec_temb",
            dim=d.dim,
            **non_default(frequency_embedding_size=d.time_freq_dim),
            max_timestep=1.0,
        ),
        "dec_transformer": t(
            P + "trunks.transformers.FlexTransformer",
            input_seq_read_key="dec_packed_seq",
            output_seq_write_key="dec_packed_seq",
            dim=d.dim,
            depth=d.depth,
            head_dim=d.head_dim,
            **non_default(mlp_ratio=d.mlp_ratio),
            block_mask_read_key="dec_block_mask",
            adaLN_emb_read_key="dec_temb",
            adaLN_packing_fn_read_key="dec_emb_packing_fn",
            adaLN_expansion=2,
            intermediate_layer_write_key="dec_packed_seq_repa_layer",
            intermediate_layers=[d.repa_layer] if d.repa_layer is not None else [],
        ),
        "dec_unpacker": t(
            P + "postprocessors.seq_unpacking.SequenceUnpacker",
            packed_seq_read_key="dec_packed_seq",
            inner_seq_write_keys=["dec_patches", "dec_quants"],
            inner_packed_shapes_read_key="dec_ps_inner",
            outer_packed_shapes_read_key="dec_ps_outer",
        ),
        "dec_to_patches": t(
            P + "postprocessors.heads.ToPatchesLinearHead",
            read_key="dec_patches",
            write_key="vae_latents_reconst_bhwc",
            dim=d.dim,
            channels_out=C,
            patch_sizes=p,
            use_mup_readout=False,
            adaLN_emb_read_key="dec_temb",
        ),
        "dec_channels_to_first": t(
            P + "utils.dict_ops.PerSampleOp",
            read_key="vae_latents_reconst_bhwc",
            write_key="vae_latents_reconst",
            per_sample_op=to_first,
        ),
    }
    return {
        "_target_": OFFICIAL_ROOT,
        "vae": t(
            "flextok.vae_wrapper.StableDiffusionVAE",
            images_read_key="rgb",
            vae_latents_read_key="vae_latents_reconst",
            vae_latents_write_key="vae_latents",
            images_reconst_write_key="rgb_reconst",
            vae_kl_loss_write_key="vae_kl_loss",
            latent_channels=C,
            scaling_factor=cfg.vae.scaling_factor,
            hf_hub_path=hf_hub_path,
            sample_posterior=cfg.vae.sample_posterior,
            frozen=True,
        ),
        "encoder": t(P + "utils.wrappers.SequentialModuleDictWrapper", module_dict=encoder),
        "regularizer": t(
            "flextok.regularizers.quantize_fsq.FSQ",
            latents_read_key="enc_registers",
            quants_write_key="enc_registers_quant",
            tokens_write_key="token_ids",
            levels=list(cfg.fsq_levels),
        ),
        "decoder": t(P + "utils.wrappers.SequentialModuleDictWrapper", module_dict=decoder),
        "flow_matching_noise_module": t(
            "flextok.flow_matching.noise_modules.MinRFNoiseModule",
            clean_images_read_key="vae_latents",
            noised_images_write_key="vae_latents_noised",
            timesteps_write_key="timesteps",
            sigmas_write_key="sigmas",
            ln=True,
        ),
        "pipeline": t(
            "flextok.flow_matching.pipelines.MinRFPipeline",
            _partial_=True,
            target_sizes_read_key=None,
            latents_read_key="enc_registers_quant",
            timesteps_read_key="timesteps",
            noised_images_read_key="vae_latents_noised",
            reconst_write_key="vae_latents_reconst",
            out_channels=C,
        ),
    }


# ---------------------------------------------------------------------------------------------------
# Parameter names: official <-> ours. `{l}` is a block index. Position tables change layout.
# ---------------------------------------------------------------------------------------------------
E, D = "encoder.module_dict.", "decoder.module_dict."
NAME_MAP: list[tuple[str, str]] = [
    (E + "enc_patch_emb.patch_proj.{w}", "encoder.patch_embed.{w}"),
    (E + "enc_posemb_module.posembs", "encoder.pos_embed"),
    (E + "enc_register_module.registers", "encoder.registers"),
    (E + "enc_transformer.blocks.{l}.{m}.weight", "encoder.blocks.{l}.{m}.weight"),
    (E + "enc_to_latents.proj.{w}", "encoder.to_latents.{w}"),
    (D + "dec_from_latents.proj.{w}", "decoder.token_embed.{w}"),
    (D + "dec_registers_posemb_module.posembs", "decoder.register_pos_embed"),
    (D + "dec_nested_dropout.dropout_mask_token", "decoder.mask_token"),
    (D + "dec_latent_dropout.nullcond", "decoder.null_cond"),
    (D + "dec_noise_patch_emb.patch_proj.{w}", "decoder.patch_embed.{w}"),
    (D + "dec_patches_posemb_module.posembs", "decoder.pos_embed"),
    (D + "dec_time_embedder.mlp.0.{w}", "decoder.time_embed.fc1.{w}"),
    (D + "dec_time_embedder.mlp.2.{w}", "decoder.time_embed.fc2.{w}"),
    (D + "dec_transformer.blocks.{l}.adaLN_modulation.1.{w}", "decoder.blocks.{l}.adaLN.{w}"),
    (D + "dec_transformer.blocks.{l}.{m}.weight", "decoder.blocks.{l}.{m}.weight"),
    (D + "dec_to_patches.adaLN_modulation.1.{w}", "decoder.final_adaLN.{w}"),
    (D + "dec_to_patches.proj.{w}", "decoder.final_proj.{w}"),
    ("vae.vae.{rest}", "vae.autoencoder.{rest}"),
]
_FIELDS = {
    "w": r"(?P<w>weight|bias)",
    "l": r"(?P<l>\d+)",
    "m": r"(?P<m>(?:attn\.(?:wq|wk|wv|proj)|mlp\.fc[123]))",
    "rest": r"(?P<rest>.+)",
}


def _compile(template: str) -> re.Pattern:
    out = re.escape(template)
    for field, pattern in _FIELDS.items():
        out = out.replace(re.escape("{" + field + "}"), pattern)
    return re.compile(out + "$")


_RULES = [(_compile(a), a, _compile(b), b) for a, b in NAME_MAP]


def _rename(name: str, to_ours: bool) -> str | None:
    for pat_off, tpl_off, pat_ours, tpl_ours in _RULES:
        m = (pat_off if to_ours else pat_ours).fullmatch(name)
        if m:
            return (tpl_ours if to_ours else tpl_off).format(**m.groupdict())
    return None


def _to_ours(name: str, t: Tensor) -> Tensor:
    if name.endswith("pos_embed") and name != "decoder.register_pos_embed":
        return rearrange(t, "1 d h w -> (h w) d")  # [1, D, G, G] -> [G*G, D]
    if name == "decoder.register_pos_embed":
        return rearrange(t, "1 1 d n -> n d")
    return t


def _to_official(name: str, t: Tensor, grid: int) -> Tensor:
    if name.endswith("pos_embed") and name != "decoder.register_pos_embed":
        return rearrange(t, "(h w) d -> 1 d h w", h=grid)
    if name == "decoder.register_pos_embed":
        return rearrange(t, "n d -> 1 1 d n")
    return t


def official_state_dict_to_ours(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    ours, unknown = {}, []
    for name, t in tensors.items():
        new = _rename(name, to_ours=True)
        if new is None:
            unknown.append(name)
        else:
            ours[new] = _to_ours(new, t)
    if unknown:
        raise CheckpointError(
            f"checkpoint has {len(unknown)} tensor(s) with no counterpart in this model: {sorted(unknown)}"
        )
    return ours


def ours_state_dict_to_official(model: Any) -> dict[str, Tensor]:
    grid = model.encoder.grid
    out = {}
    for name, t in model.state_dict().items():
        off = _rename(name, to_ours=False)
        if off is None:
            raise CheckpointError(f"no official name for tensor '{name}'")
        out[off] = _to_official(name, t, grid).contiguous()
    return out


# ---------------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------------
def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: the model's identity."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        _hash_tensor(h, name, state_dict[name])
    return h.hexdigest()


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without another copy


# safetensors dtype names -> torch (https://github.com/huggingface/safetensors, format header)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """({tensor name: {dtype, shape, data_offsets}}, offset of the data) from a .safetensors file's header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header")
    header.pop("__metadata__", None)
    return header, 8 + size


def streamed_weights_digest(weights: Path, model: Any | None = None, official: bool = False) -> str:
    """`weights_digest(model.state_dict())` of the model loaded from `weights`, read one tensor at a time.
    `model` (on the meta device: no memory for weights) gives the names, dtypes and shapes loading checks and
    casts to; without it the file's names are taken as they are and floating tensors are cast to torch's
    default dtype, as loading into a freshly built FlexTok does (its builder never needs diffusers then).
    `official`: the file has the release's tensor names and layouts."""
    header, data_start = read_safetensors_header(weights)
    file_name = {(_rename(k, to_ours=True) if official else k): k for k in header}
    if None in file_name:
        unknown = sorted(k for k in header if _rename(k, to_ours=True) is None)
        raise CheckpointError(f"checkpoint has {len(unknown)} tensor(s) with no counterpart in this model: {unknown}")
    expected = model.state_dict() if model is not None else None
    if expected is not None:
        missing, extra = sorted(set(expected) - set(file_name)), sorted(set(file_name) - set(expected))
        if missing or extra:
            raise CheckpointError(f"checkpoint does not match the model: missing tensors {missing}, unexpected {extra}")
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for name in sorted(file_name):
            entry = header[file_name[name]]
            if entry.get("dtype") not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{weights}: tensor {file_name[name]} has unsupported dtype {entry.get('dtype')}")
            begin, end = entry["data_offsets"]
            raw = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(raw) != len(raw):
                raise CheckpointError(f"{weights} is truncated (tensor {file_name[name]})")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            t = t.reshape(entry["shape"])
            t = _to_ours(name, t) if official else t
            if expected is None:
                _hash_tensor(h, name, t.to(torch.get_default_dtype()) if t.is_floating_point() else t)
                continue
            if t.shape != expected[name].shape:
                raise CheckpointError(
                    f"checkpoint does not match the model: shape mismatches "
                    f"['{name}: checkpoint {list(t.shape)} vs model {list(expected[name].shape)}']"
                )
            _hash_tensor(h, name, t.to(expected[name].dtype))  # loading casts to the model's dtype
    return h.hexdigest()


def load_state_dict_strict(model: Any, tensors: dict[str, Tensor]) -> None:
    """Copy tensors into the model; any missing, extra, or wrongly shaped tensor is an error listing them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {list(tensors[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True, assign=False)


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _official_config_from_safetensors(path: Path) -> dict:
    """The release also stores its config in the safetensors header, as Python literals (not JSON)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if not meta:
        raise CheckpointError(f"{path} has no config.json beside it and no config in its header")
    cfg: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            cfg[key] = ast.literal_eval(value)  # literals only: no names, calls or attribute access
        except (ValueError, SyntaxError):
            cfg[key] = value
    return cfg


def _resolve_vae_arch(folder: Path, hf_hub_path: str | None) -> dict | None:
    """The AutoencoderKL config named by the official `hf_hub_path`: a subfolder, or a hub id."""
    if hf_hub_path is None:
        return None
    local = Path(hf_hub_path) if Path(hf_hub_path).is_absolute() else folder / hf_hub_path
    if (local / "config.json").is_file():
        arch = _read_json(local / "config.json")
    else:
        from huggingface_hub import hf_hub_download  # hub ids only; never reached in tests

        arch = _read_json(Path(hf_hub_download(hf_hub_path, "config.json")))
    cls = arch.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise CheckpointError(f"VAE config '{hf_hub_path}' is a {cls!r}, expected 'AutoencoderKL'")
    unknown = sorted(set(arch) - VAE_ARCH_KEYS - VAE_BOOKKEEPING_KEYS)
    if unknown:
        raise CheckpointError(f"unknown VAE config key(s) {[f'vae.{k}' for k in unknown]} in '{hf_hub_path}'")
    return arch


def _local_folder(path_or_hub_id: str | Path) -> Path:
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and model.safetensors")
    text = str(path_or_hub_id)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download  # hub ids only; never reached in tests

        return Path(snapshot_download(text, allow_patterns=["config.json", "model.safetensors"]))
    raise CheckpointError(f"no such checkpoint folder or hub id: {text}")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a FlexTok checkpoint folder says without loading its weights."""

    folder: Path  # holds model.safetensors
    cfg: FlexTokConfig
    official: bool  # the release's format (tensor names and layouts translated on load)

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def codebook_size(self) -> int:
        return math.prod(self.cfg.fsq_levels)

    def digest(self) -> str:
        """The loaded model's `weights_digest`, streamed from the file: a driver learns a checkpoint's identity
        without holding its weights or importing the VAE's library (diffusers, ~280 MB). Whether the tensors
        fit the config is checked where the model is built (the actors), not here."""
        return streamed_weights_digest(self.weights, official=self.official)


def read_checkpoint_info(path_or_hub_id: str | Path) -> CheckpointInfo:
    """The folder and configuration of a checkpoint (config.json, or the release's safetensors header)."""
    folder = _local_folder(path_or_hub_id)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors")
    raw = (
        _read_json(folder / "config.json")
        if (folder / "config.json").is_file()
        else _official_config_from_safetensors(weights)
    )
    if raw.get("format") == FORMAT:
        if raw.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {raw.get('version')} is not supported (expected {FORMAT_VERSION})"
            )
        return CheckpointInfo(folder, FlexTokConfig.from_dict(raw["config"]), official=False)
    if "_target_" in raw:
        cfg = official_to_config(raw, _resolve_vae_arch(folder, raw["vae"].get("hf_hub_path")))
        return CheckpointInfo(folder, cfg, official=True)
    raise CheckpointError(f"{folder / 'config.json'} is neither our format nor the official hydra format")


def load_pretrained(path_or_hub_id: str | Path, map_location: str | torch.device = "cpu") -> Any:
    from .model import FlexTok

    info = read_checkpoint_info(path_or_hub_id)
    tensors = load_file(str(info.weights), device=str(map_location))
    if info.official:
        tensors = official_state_dict_to_ours(tensors)
    with torch.device("meta"):
        model = FlexTok(info.cfg)
    model = model.to_empty(device=map_location)
    _rebuild_nonpersistent(model)
    load_state_dict_strict(model, tensors)
    return model.eval()


def _rebuild_nonpersistent(model: Any) -> None:
    """Buffers that are not in checkpoints (masks, FSQ tables) must be recomputed after to_empty."""
    from .encoder import register_causal_mask
    from .fsq import FSQ

    device = model.decoder.mask_token.device
    fresh = FSQ(model.cfg.fsq_levels)
    for name, buf in fresh.named_buffers():
        setattr(model.fsq, name, buf.to(device))
    model.encoder.attn_mask = register_causal_mask(model.encoder.num_patches, model.cfg.num_registers).to(device)


def save_pretrained(model: Any, directory: str | Path) -> None:
    """Write our format: config.json + model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.cfg.to_dict()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": FORMAT})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_official(model: Any, directory: str | Path, vae_hub_path: str = "vae") -> None:
    """Write the official layout (hydra config.json, official tensor names, vae/config.json), as the
    release's `FlexTokFromHub.from_pretrained` reads it. Used to test the importer on other sizes.
    `vae_hub_path` is what the config names as the VAE: the subfolder "vae" (written here) or a hub id."""
    directory = Path(directory)
    (directory / "vae").mkdir(parents=True, exist_ok=True)
    cfg = config_to_official(model.cfg, hf_hub_path=vae_hub_path)
    tensors = ours_state_dict_to_official(model)
    metadata = {k: repr(v) for k, v in cfg.items()}
    save_file({k: v.cpu() for k, v in tensors.items()}, str(directory / "model.safetensors"), metadata=metadata)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    vae_cfg = {"_class_name": "AutoencoderKL", **dict(model.vae.autoencoder.config)}
    vae_cfg = {k: v for k, v in vae_cfg.items() if k in VAE_ARCH_KEYS | {"_class_name"}}
    (directory / "vae" / "config.json").write_text(json.dumps(vae_cfg, indent=2, default=list))
