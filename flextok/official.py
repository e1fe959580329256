"""Import of the official FlexTok hub format (apple/ml-flextok, EPFL-VILAB/flextok_*) into our model.

Official format, a folder or hub id:
    config.json         hydra-style: nested dicts with `_target_` class paths
    model.safetensors   official parameter names (same config in the header metadata as Python literals)
    vae/                the AutoencoderKL config (diffusers layout), named by `vae.hf_hub_path`: a folder
                        inside the checkpoint folder, or a hub id

Nothing here instantiates a `_target_` or evaluates a string: the hydra config is *read* against an
explicit allowlist (every target, and every setting of each target, must be known) and translated into
our dataclasses (`official_to_config`); tensors are renamed by one table (`NAME_MAP`).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from einops import rearrange
from safetensors import safe_open
from torch import Tensor

from .config import SD_VAE_ARCH, DecoderConfig, EncoderConfig, FlexTokConfig, VAEConfig
from .errors import CheckpointError

OFFICIAL_ROOT = "flextok.flextok_wrapper.FlexTok"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as huggingface_hub spells repo ids

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


def ours_state_dict_to_official(state_dict: dict[str, Tensor], grid: int) -> dict[str, Tensor]:
    """Our tensors -> official names and layouts (`grid`: patches per side); the inverse of the above."""
    out = {}
    for name, t in state_dict.items():
        off = _rename(name, to_ours=False)
        if off is None:
            raise CheckpointError(f"no official name for tensor '{name}'")
        out[off] = _to_official(name, t, grid).contiguous()
    return out


# ---------------------------------------------------------------------------------------------------
# Files: the config in the safetensors header, and the VAE config that `vae.hf_hub_path` names
# ---------------------------------------------------------------------------------------------------
def config_from_safetensors_header(path: Path) -> dict:
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


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.fullmatch(text)) and not text.startswith((".", "/")) and ".." not in text


def vae_arch(folder: Path, hf_hub_path: str | None) -> dict | None:
    """The AutoencoderKL config named by the official `vae.hf_hub_path`.

    A path (relative to the checkpoint folder, or absolute) must lie inside the checkpoint folder. Only when
    no such folder exists and the text has the form `owner/name` is it fetched as a hub id (config.json only).
    The error says which of the two was tried."""
    if hf_hub_path is None:
        return None
    root = folder.resolve()
    local = (root / hf_hub_path).resolve()  # an absolute hf_hub_path replaces root here
    if not local.is_relative_to(root):
        raise CheckpointError(
            f"vae.hf_hub_path {hf_hub_path!r} points outside the checkpoint folder {root} (resolves to {local})"
        )
    if (local / "config.json").is_file():
        arch = json.loads((local / "config.json").read_text())
    elif is_hub_id(hf_hub_path) and not Path(hf_hub_path).is_absolute():
        from huggingface_hub import hf_hub_download  # hub ids only; tests replace it

        try:
            arch = json.loads(Path(hf_hub_download(hf_hub_path, "config.json")).read_text())
        except Exception as e:  # network, missing repo, bad JSON: one message naming both attempts
            raise CheckpointError(
                f"vae.hf_hub_path {hf_hub_path!r}: no folder {local} with a config.json, and fetching it as a hub "
                f"id failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
    else:
        raise CheckpointError(
            f"vae.hf_hub_path {hf_hub_path!r}: no folder {local} with a config.json (and it is not a hub id)"
        )
    cls = arch.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise CheckpointError(f"VAE config '{hf_hub_path}' is a {cls!r}, expected 'AutoencoderKL'")
    unknown = sorted(set(arch) - VAE_ARCH_KEYS - VAE_BOOKKEEPING_KEYS)
    if unknown:
        raise CheckpointError(f"unknown VAE config key(s) {[f'vae.{k}' for k in unknown]} in '{hf_hub_path}'")
    return arch


def read_official_config(folder: Path, cfg: dict) -> FlexTokConfig:
    """An official hydra config (with the VAE config it names) -> our config."""
    vae = cfg.get("vae") if isinstance(cfg.get("vae"), dict) else {}
    return official_to_config(cfg, vae_arch(folder, vae.get("hf_hub_path")))
