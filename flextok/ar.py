"""Class-conditional autoregressive model over FlexTok token sequences (the paper's AR experiments).

A GPT-style decoder with Llama blocks (RMSNorm, SwiGLU, rotary positions, no biases). The class is
embedded as the first position; during training its label is replaced by a learned null class with
probability `class_dropout_prob`, which classifier-free guidance needs at sampling time:

    logits = model(labels, tokens[:, :-1])          # [B, k, V]: position i predicts tokens[:, i]
    loss = model.loss(labels, tokens)               # next-token cross-entropy
    tokens = model.generate(labels, num_tokens=k, cfg_scale=3.0, top_k=...)  # [B, k], KV cache

With `eos=True` (adaptive corpora: rows of different lengths) the vocabulary has one more id, `eos_id`, that
ends a sequence: the loss appends it after each row's last token, and `generate` stops each sample when it
draws it (`num_tokens` is then the most tokens a sample may take):

    tokens, lengths = model.generate(labels, num_tokens=32, return_lengths=True)  # [B, T], [B]; T = max(lengths)

Sizes follow FlexTok's muP convention (width = 64 * depth, head_dim 64); the names give the depth and
the size is the transformer's parameter count without the 64k-vocab embeddings and output head:
d10 ~49M, d12 ~85M, d16 ~201M, d20 ~393M, d24 ~680M, d30 ~1.33B.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .checkpoint import CheckpointError, is_url, load_state_dict_strict, local_copy, streamed_weights_digest

FORMAT = "flextok-pipeline-ar"
FORMAT_VERSION = 1


@dataclass
class ARConfig:
    vocab_size: int = 64000  # FlexTok's FSQ codebook (8*8*8*5*5*5)
    num_classes: int = 1000  # class ids 0..num_classes-1; id num_classes is the null class
    max_tokens: int = 256  # longest token sequence (the tokenizer's number of registers)
    dim: int = 768
    depth: int = 12
    head_dim: int = 64
    mlp_ratio: float = 4.0  # SwiGLU hidden size = int(2/3 * mlp_ratio * dim)
    class_dropout_prob: float = 0.1  # train-time probability of the null class (for CFG)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    vocab_dim: int = 0  # 0: token embedding and output head of width `dim`; > 0: one shared (tied) token table
    #                     [vocab_size, vocab_dim] with projections to and from `dim` (small models: 64000 x dim
    #                     would dwarf the transformer)
    eos: bool = False  # one extra id (vocab_size) that ends a sequence; off: every sequence has a fixed length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ARConfig:
        """Build from `to_dict` output. Only the dataclass's own fields with the right types are accepted;
        anything else is an error naming the key."""
        if not isinstance(d, dict):
            raise CheckpointError(f"AR config must be a mapping, got {type(d).__name__}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(types))
        if unknown:
            raise CheckpointError(f"unknown AR config key(s) {unknown}; known: {sorted(types)}")
        for key, value in d.items():
            if types[key] == "bool":
                ok = isinstance(value, bool)
            else:
                ok = not isinstance(value, bool) and isinstance(value, int | float if types[key] == "float" else int)
            if not ok:
                raise CheckpointError(f"AR config '{key}' must be {types[key]}, got {value!r}")
        return cls(**{k: float(v) if types[k] == "float" else v for k, v in d.items()})


def _mup(depth: int, **overrides: Any) -> ARConfig:
    return ARConfig(**{"dim": 64 * depth, "depth": depth, "head_dim": 64, **overrides})


AR_PRESETS = {
    "tiny": lambda **o: ARConfig(**{"dim": 64, "depth": 2, "head_dim": 16, "max_tokens": 32, **o}),
    "small": lambda **o: ARConfig(**{"dim": 128, "depth": 4, "head_dim": 32, "max_tokens": 32, "vocab_dim": 16, **o}),
    "d10": lambda **o: _mup(10, **o),
    "d12": lambda **o: _mup(12, **o),
    "d16": lambda **o: _mup(16, **o),
    "d20": lambda **o: _mup(20, **o),
    "d24": lambda **o: _mup(24, **o),
    "d30": lambda **o: _mup(30, **o),
}


def ar_preset(name: str, **overrides: Any) -> ARConfig:
    """A named size; keyword overrides replace fields (e.g. `ar_preset("tiny", max_tokens=64)`)."""
    if name not in AR_PRESETS:
        raise ValueError(f"unknown AR preset '{name}'; choose one of {sorted(AR_PRESETS)}")
    return AR_PRESETS[name](**overrides)


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------
def rope_tables(start: int, length: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rotary angles for positions start..start+length-1 -> cos, sin [length, head_dim/2] (float32)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(start, start + length, dtype=torch.float32, device=device)[:, None] * freqs
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, L, hd] rotated pairwise (first half, second half of the head dims) by the angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of one attention layer, preallocated up to `max_len` positions."""

    def __init__(self, batch: int, num_heads: int, head_dim: int, max_len: int, device, dtype):
        self.k = torch.zeros(batch, num_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, H, L, hd] -> all keys and values so far [B, H, length, hd]."""
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        assert dim % head_dim == 0, f"dim {dim} is not a multiple of head_dim {head_dim}"
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        """x [B, L, D] at the positions of cos/sin; causal over the cache's earlier positions too."""
        B, L, D = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B,H,L,hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        S = k.shape[2]  # keys so far; the queries are the last L of them
        if L == S:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(diagonal=S - L)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate (SiLU)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Llama block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.head_dim)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_ratio)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class ARModel(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: the null class
        tied = cfg.vocab_dim > 0
        self.num_outputs = cfg.vocab_size + int(cfg.eos)  # the token ids, then EOS when the model has it
        self.tok_embed = nn.Embedding(self.num_outputs, cfg.vocab_dim if tied else cfg.dim)
        self.tok_in = nn.Linear(cfg.vocab_dim, cfg.dim, bias=False) if tied else None  # table width -> dim
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        # tied: dim -> table width, then logits against the same table; else one [V, dim] output matrix
        self.head = nn.Linear(cfg.dim, cfg.vocab_dim if tied else self.num_outputs, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth)."""
        if self.head.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            for w in (block.attn.proj.weight, block.mlp.w2.weight):
                nn.init.normal_(w, std=0.02 / (2 * self.cfg.depth) ** 0.5)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    @property
    def eos_id(self) -> int | None:
        """The id that ends a sequence (vocab_size), or None when the model has none."""
        return self.cfg.vocab_size if self.cfg.eos else None

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def num_params(self, embeddings: bool = False) -> int:
        """Parameter count; without the token/class embeddings and the output head unless asked."""
        skip = () if embeddings else ("tok_embed.", "tok_in.", "class_embed.", "head.")
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(skip))

    # ------------------------------------------------------------------ forward
    def check_inputs(self, labels: Tensor, tokens: Tensor | None = None) -> None:
        c, V = self.cfg.num_classes, self.cfg.vocab_size
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor [B], got {labels.dtype} {list(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > c):
            raise ValueError(f"labels must lie in 0..{c} ({c} = the null class), got {labels.tolist()[:8]}")
        if tokens is None:
            return
        if tokens.ndim != 2 or tokens.shape[0] != labels.shape[0] or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be integer [B, T] with B = {labels.shape[0]}, got {list(tokens.shape)}")
        if tokens.shape[1] >= self.cfg.max_tokens:
            raise ValueError(f"at most max_tokens - 1 = {self.cfg.max_tokens - 1} input tokens, got {tokens.shape[1]}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(f"token ids must lie in 0..{V - 1}")

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] -> [B, T, D]."""
        x = self.tok_embed(tokens)  # [B, T, D] or, tied, [B, T, vocab_dim]
        return self.tok_in(x) if self.tok_in is not None else x

    def embed(self, labels: Tensor, tokens: Tensor) -> Tensor:
        """labels [B], tokens [B, T] -> [class | tokens] embeddings [B, 1+T, D]."""
        return torch.cat([self.class_embed(labels)[:, None], self.embed_tokens(tokens)], dim=1)

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states [B, L, D] -> logits [B, L, V] (float32; V + 1 with EOS, its logit last)."""
        out = self.head(self.norm(h))  # [B, L, V] or, tied, [B, L, vocab_dim]
        if self.tok_in is not None:
            out = out @ self.tok_embed.weight.T  # [B, L, V]
        return out.float()

    def hidden(self, x: Tensor, start: int = 0, caches: list[KVCache] | None = None) -> Tensor:
        """Embeddings [B, L, D] at positions start..start+L-1 -> final hidden states [B, L, D]."""
        cos, sin = rope_tables(start, x.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, caches[i] if caches is not None else None)
        return x

    def transformer(self, x: Tensor, start: int = 0, caches: list[KVCache] | None = None) -> Tensor:
        """Embeddings [B, L, D] at positions start..start+L-1 -> logits [B, L, V] (float32)."""
        return self.logits(self.hidden(x, start, caches))

    def forward(self, labels: Tensor, tokens: Tensor) -> Tensor:
        """labels [B], tokens [B, T] (T < max_tokens) -> logits [B, 1+T, V]; position i predicts token i."""
        self.check_inputs(labels, tokens)
        return self.transformer(self.embed(labels, tokens))

    def drop_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by the null class with probability class_dropout_prob (training only)."""
        if not self.training or self.cfg.class_dropout_prob <= 0:
            return labels
        drop = (torch.rand(labels.shape, generator=generator) < self.cfg.class_dropout_prob).to(labels.device)
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def loss(
        self,
        labels: Tensor,
        tokens: Tensor,
        lengths: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Mean next-token cross-entropy (nats) over tokens [B, T]; `lengths` [B] marks valid prefixes
        of padded rows (default: all T). With EOS, each row's target continues with EOS after its last
        token, unless it already holds max_tokens (generation stops there anyway). In training mode labels
        are dropped to the null class (CFG)."""
        B, T = tokens.shape
        if self.cfg.max_tokens < T:
            raise ValueError(f"sequences longer than max_tokens={self.cfg.max_tokens}: {T}")
        lengths = torch.full((B,), T, device=tokens.device) if lengths is None else lengths.to(tokens.device)
        targets = tokens.long()
        if self.cfg.eos:  # room for EOS after the longest row: [B, T'], T' = min(T + 1, max_tokens)
            targets = torch.cat([targets, targets.new_zeros(B, 1)], dim=1)[:, : self.cfg.max_tokens]
        inputs = targets[:, :-1]  # [B, T' - 1]: position i predicts targets[:, i] from inputs[:, :i]
        pos = torch.arange(targets.shape[1], device=tokens.device)[None]  # [1, T']
        if self.cfg.eos:
            targets = torch.where(pos == lengths[:, None], self.eos_id, targets)
            valid = pos <= lengths[:, None]
        else:
            valid = pos < lengths[:, None]
        labels = self.drop_labels(labels, generator)
        self.check_inputs(labels, inputs)
        h = self.hidden(self.embed(labels, inputs))  # [B, T', D]
        logits = self.logits(h[valid])  # [N, V(+1)]: the output head only where there is a target, not on padding
        return F.cross_entropy(logits, targets[valid])

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        num_tokens: int,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_lengths: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Sample token sequences [B, num_tokens] for class labels [B] (label num_classes = unconditional).

        CFG mixes logits: uncond + cfg_scale * (cond - uncond) (1.0: no unconditional pass). Then
        temperature (0 = greedy), top-k, top-p. `use_cache=False` recomputes the whole prefix each step
        and gives the same tokens (a check of the KV cache).

        With EOS, `num_tokens` is the most a sample may take: a sample ends when it draws EOS (never as its
        first token) and stays as it is while the others go on; the loop stops when all have ended. Then
        the result is [B, T], T = the longest sample, filled with `eos_id` after each sample's end (no valid
        token id, so decoding a row whole fails loudly). `return_lengths`: also the lengths [B] (without
        EOS; num_tokens for every sample of a model without EOS)."""
        labels = torch.as_tensor(labels, device=self.device)
        self.check_inputs(labels)
        if not 1 <= num_tokens <= self.cfg.max_tokens:
            raise ValueError(f"num_tokens must be in 1..{self.cfg.max_tokens}, got {num_tokens}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        B, guided = labels.shape[0], cfg_scale != 1.0
        if guided:  # one batch: [conditional; unconditional]
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        tokens = torch.empty(labels.shape[0], 0, dtype=torch.long, device=self.device)
        caches = self.new_caches(labels.shape[0], num_tokens) if use_cache else None
        lengths = torch.full((B,), num_tokens, dtype=torch.long, device=self.device)
        ended = torch.zeros(B, dtype=torch.bool, device=self.device)
        for i in range(num_tokens):
            if caches is None:
                logits = self(labels, tokens)[:, -1]  # [B(x2), V]
            else:
                x = self.class_embed(labels)[:, None] if i == 0 else self.embed_tokens(tokens[:, -1:])
                logits = self.transformer(x, start=i, caches=caches)[:, -1]
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            if self.cfg.eos and i == 0:
                logits[:, self.eos_id] = float("-inf")  # at least one token
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # [B]
            if self.cfg.eos:
                now = ~ended & (nxt == self.eos_id)
                lengths[now] = i
                ended |= now
                nxt = nxt.masked_fill(ended, 0)  # an input id for the ended samples; replaced below
            tokens = torch.cat([tokens, nxt.repeat(2 if guided else 1)[:, None]], dim=1)
            if ended.all():
                break
        tokens = tokens[:B, : int(lengths.max())]  # [B, T]
        if self.cfg.eos:
            tokens = tokens.masked_fill(
                torch.arange(tokens.shape[1], device=self.device) >= lengths[:, None], self.eos_id
            )
        return (tokens, lengths) if return_lengths else tokens

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        dtype = self.head.weight.dtype
        H, hd = self.cfg.dim // self.cfg.head_dim, self.cfg.head_dim
        return [KVCache(batch, H, hd, max_len, self.device, dtype) for _ in self.blocks]

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "version": FORMAT_VERSION, "config": self.cfg.to_dict()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": FORMAT})
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @staticmethod
    def read_config(directory: str | Path) -> ARConfig:
        """The configuration of a folder written by `save_pretrained`, checked key by key (weights not read);
        a local path or an fsspec URL (s3://...)."""
        if is_url(directory):
            with local_copy(str(directory)) as folder:
                return ARModel.read_config(folder)
        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise CheckpointError(f"{directory} must hold config.json and model.safetensors")
        raw = json.loads((directory / "config.json").read_text())
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CheckpointError(f"{directory / 'config.json'} is not an AR checkpoint (format '{FORMAT}')")
        if raw.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"AR checkpoint version {raw.get('version')} is not supported ({FORMAT_VERSION})")
        return ARConfig.from_dict(raw.get("config"))

    @classmethod
    def file_digest(cls, directory: str | Path) -> str:
        """`weights_digest` of the model in `directory`, streamed from its file without loading the model."""
        if is_url(directory):
            with local_copy(str(directory)) as folder:
                return cls.file_digest(folder)
        with torch.device("meta"):
            model = cls(cls.read_config(directory))
        return streamed_weights_digest(Path(directory) / "model.safetensors", model)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> ARModel:
        """Load a folder written by `save_pretrained` (safetensors only; config checked key by key); a local
        path or an fsspec URL (s3://...)."""
        if is_url(directory):
            with local_copy(str(directory)) as folder:
                return cls.from_pretrained(folder, map_location)
        directory = Path(directory)
        cfg = cls.read_config(directory)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=map_location)
        load_state_dict_strict(model, load_file(str(directory / "model.safetensors"), device=str(map_location)))
        return model.eval()


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> token ids [B]. One uniform draw per row from `generator` (inverse CDF), so the
    same generator state gives the same tokens for the same probabilities."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    u = torch.rand(logits.shape[0], 1, generator=generator, device=generator.device if generator else None)
    u = u.to(logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(logits.shape[-1] - 1).squeeze(1)
