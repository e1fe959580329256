"""Export of our model to the official FlexTok hub layout, for tests only.

The library only imports the official format (flextok/official.py); nothing in it writes that format. The tests
use this exporter to make official-format checkpoints of sizes the shared fixture does not have, and to check
that `config_to_official` reproduces the fixture's config.json (so the importer's reading of each setting is
the release's). `save_official` writes a folder the release's own loader reads as it is (checked once by hand,
see README, Official checkpoints): hydra config.json, model.safetensors (official names, config in the header), and
vae/ in the diffusers layout (config.json + diffusion_pytorch_model.safetensors), named by its absolute path
because the release resolves `hf_hub_path` against the current directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from flextok import FlexTok, FlexTokConfig
from flextok.errors import CheckpointError
from flextok.official import OFFICIAL_ROOT, P, ours_state_dict_to_official


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


def save_official(model: FlexTok, directory: str | Path, vae_hub_path: str | None = None) -> None:
    """Write `model` in the official layout. `vae_hub_path` is what the config names as the VAE: by default
    the absolute path of the vae/ folder written here; a hub id to test hub resolution."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    vae_dir = directory / "vae"
    cfg = config_to_official(model.cfg, hf_hub_path=vae_hub_path or str(vae_dir))
    tensors = ours_state_dict_to_official(model.state_dict(), model.encoder.grid)
    metadata = {k: repr(v) for k, v in cfg.items()}
    save_file({k: v.cpu() for k, v in tensors.items()}, str(directory / "model.safetensors"), metadata=metadata)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    model.vae.autoencoder.save_pretrained(vae_dir)  # diffusers: config.json + diffusion_pytorch_model.safetensors
