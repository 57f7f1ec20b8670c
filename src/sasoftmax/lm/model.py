"""A decoder-only, pre-norm GPT whose attention normalizer and positional encoding are chosen by name.

``GPTConfig.normalizer`` names an entry of :mod:`sasoftmax.normalizers` (``softmax``, ``sa_softmax``, ...) and
``GPTConfig.positional`` one of :mod:`sasoftmax.positional` (``nope``, ``rope``, ``alibi``, ``kerple_log``,
``kerple_power``, ``fire``). There is no learned absolute position table, so every configuration runs on sequences
longer than ``block_size`` (length extrapolation).

Each layer owns its positional module (Kerple/FIRE parameters are per layer, as in GPT-NeoX-style implementations).
Attention is always the registry entry called with ``is_causal=True``; ALiBi goes in as ``alibi_slopes`` so the
SA-Softmax path keeps O(N*D) activation memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import available_backends
from ..normalizers import Normalizer, get_normalizer, list_normalizers
from ..positional import get_positional, list_positionals

__all__ = ["GPTConfig", "GPT", "CausalSelfAttention", "MLP", "Block", "KVCache", "PRESETS"]

# name -> field overrides; everything else keeps the GPTConfig default.
PRESETS: dict[str, dict[str, object]] = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, block_size=128),
    "125m": dict(n_layer=12, n_embd=768, n_head=12),
    "350m": dict(n_layer=24, n_embd=1024, n_head=16),
    "2.7b": dict(n_layer=32, n_embd=2560, n_head=32),
}


@dataclass
class GPTConfig:
    """Model hyper-parameters. ``validate()`` raises ``ValueError`` naming the offending field."""

    vocab_size: int = 50304
    block_size: int = 512  # training context length (FIRE's L init); longer inputs are allowed
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head; fewer = grouped-query attention
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    normalizer: str = "softmax"  # sasoftmax.normalizers registry name
    positional: str = "rope"  # sasoftmax.positional registry name
    attn_backend: str = "auto"  # sa_attention backend for SA normalizers
    tie_embeddings: bool = True
    qk_norm: bool = False  # normalize q and k per head before the scores (Wortsman et al. 2023's qk-layernorm)
    qk_norm_type: str = "layernorm"  # or "rmsnorm"

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GPTConfig:
        """A preset (``tiny``, ``125m``, ``350m``, ``2.7b``) with field overrides; validated.

        ``ValueError`` for an unknown preset (listing the names) or an unknown override field."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; fields are {sorted(fields)}")
        cfg = cls(**{**PRESETS[name], **overrides})  # type: ignore[arg-type]  # field names checked above
        cfg.validate()
        return cfg

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_head`` or ``n_head``)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Check every field; ``ValueError`` naming the field and what was expected."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {val!r}")
        if self.n_kv_head is not None:
            if isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int) or self.n_kv_head <= 0:
                raise ValueError(f"GPTConfig.n_kv_head must be None or a positive int, got {self.n_kv_head!r}")
            if self.n_head % self.n_kv_head != 0:
                raise ValueError(
                    f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}) for grouped-query "
                    "attention"
                )
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.qk_norm_type not in QK_NORMS:
            raise ValueError(f"GPTConfig.qk_norm_type must be one of {sorted(QK_NORMS)}, got {self.qk_norm_type!r}")
        if self.normalizer not in list_normalizers():
            raise ValueError(f"GPTConfig.normalizer {self.normalizer!r} is unknown; known: {list_normalizers()}")
        if self.positional not in list_positionals():
            raise ValueError(f"GPTConfig.positional {self.positional!r} is unknown; known: {list_positionals()}")
        if self.attn_backend not in available_backends():
            raise ValueError(f"GPTConfig.attn_backend {self.attn_backend!r} is unknown; known: {available_backends()}")
        if self.positional == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"GPTConfig.n_embd / n_head = {self.head_dim} must be even for positional='rope' (rotated pairs)"
            )

    def to_dict(self) -> dict:
        """Plain dict of all fields (JSON-serializable), for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Inverse of :meth:`to_dict`; missing fields take defaults, unknown keys raise ``ValueError``; validated."""
        if not isinstance(d, dict):
            raise ValueError(f"GPTConfig.from_dict expects a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; fields are {sorted(fields)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


class KVCache:
    """The keys and values a model has computed, per layer, for decoding one token at a time.

    ``update(layer, k, v)`` appends ``k``/``v`` of shape ``(B, Hkv, T_new, D)`` (keys already rotated when the
    positional encoding rotates) and returns the layer's keys and values so far; ``length`` is the number of cached
    tokens (all layers hold the same). The first cached token sits at position 0."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        elif layer < len(self.keys):
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        else:
            raise ValueError(f"KVCache: layer {layer} updated before layer {len(self.keys)}")
        return self.keys[layer], self.values[layer]


QK_NORMS = ("layernorm", "rmsnorm")
"""``GPTConfig.qk_norm_type`` values: the module applied over the head dimension of q and of k (one gain per channel,
shared by the heads; a bias too for LayerNorm when ``GPTConfig.bias``)."""


def _qk_norm(config: GPTConfig) -> nn.LayerNorm | nn.RMSNorm:
    if config.qk_norm_type == "layernorm":
        return nn.LayerNorm(config.head_dim, bias=config.bias)
    return nn.RMSNorm(config.head_dim)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention through a normalizer registry entry.

    ``forward(x (B, T, C), cache=None, offset=0, key_mask=None) -> (B, T, C)``: with a :class:`KVCache` the new
    tokens (at positions ``offset .. offset+T-1``) attend to every cached one; ``key_mask`` ``(B, offset+T)`` bool
    (True = a real token) hides padding keys. ``attn_backend`` is read from the model's config at call time, so
    ``model.config.attn_backend = "reference"`` switches the SA backend of every layer."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = float(config.dropout)
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # qk-norm: before the positional rotation and the cache, so cached keys are normalized keys
        self.q_norm: nn.LayerNorm | nn.RMSNorm | None = _qk_norm(config) if config.qk_norm else None
        self.k_norm: nn.LayerNorm | nn.RMSNorm | None = _qk_norm(config) if config.qk_norm else None
        self.pos = get_positional(config.positional).build(self.n_head, self.head_dim, config.block_size)
        self.normalizer: Normalizer = get_normalizer(config.normalizer)
        if self.normalizer.init_params is not None:
            self.normalizer.init_params(self, self.n_head)
        # set by sasoftmax.lm.diagnostics.probe_attention: probe(module, q, k, v, kwargs) -> output
        self.probe: Callable[..., Tensor] | None = None

    @property
    def attn_backend(self) -> str:
        return self.config.attn_backend

    def forward(self, x: Tensor, cache: KVCache | None = None, offset: int = 0,
                key_mask: Tensor | None = None, doc_mask: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        q, k, v = self.c_attn(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.pos.rotate(q, k, offset)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        nk = k.shape[2]
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        if doc_mask is not None:  # (B, 1, T, T): packed documents attend only within themselves
            attn_mask = doc_mask if attn_mask is None else attn_mask & doc_mask
        kwargs = dict(
            attn_mask=attn_mask,
            is_causal=True,
            scale=self.scale,
            bias=self.pos.bias(T, nk, device=x.device),
            alibi_slopes=self.pos.alibi_slopes(),
            dropout_p=self.dropout if self.training else 0.0,
            module=self,
        )
        if self.probe is not None:  # gradient diagnostics: explicit scores and weights (sasoftmax.lm.diagnostics)
            y = self.probe(self, q, k, v, kwargs)
        else:
            y = self.normalizer.fn(q, k, v, **kwargs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """``Linear(C, 4C) -> GELU -> Linear(4C, C) -> dropout``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, offset: int = 0,
                key_mask: Tensor | None = None, doc_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, offset, key_mask, doc_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only causal language model.

    ``forward(idx (B, T) int64, targets (B, T) int64 | None) -> (logits (B, T, vocab), loss | None)``; ``T`` may
    exceed ``config.block_size``. The config is copied, so later edits must go to ``model.config``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"`config` must be a GPTConfig, got {type(config).__name__}")
        config.validate()
        self.config = dataclasses.replace(config)
        cfg = self.config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def layers(self) -> list[Block]:
        """The transformer blocks, in order (``self.blocks`` typed)."""
        return [cast(Block, block) for block in self.blocks]

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) for embeddings and linear layers, residual projections (``c_proj``) N(0, 0.02 /
        sqrt(2 * n_layer)), zero biases, LayerNorm (1, 0). Positional modules re-initialize themselves; parameters a
        normalizer created on the attention modules are left as its ``init_params`` made them."""
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            nn.init.normal_(self.wte.weight, 0.0, std)
            if not self.config.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, 0.0, std)
            for block in self.layers():
                for lin, s in ((block.attn.c_attn, std), (block.attn.c_proj, resid_std),
                               (block.mlp.c_fc, std), (block.mlp.c_proj, resid_std)):
                    nn.init.normal_(lin.weight, 0.0, s)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
                for ln in (block.ln_1, block.ln_2, block.attn.q_norm, block.attn.k_norm):
                    if ln is not None:
                        ln.reset_parameters()
                block.attn.pos.reset_parameters()
            self.ln_f.reset_parameters()

    def set_attn_backend(self, backend: str) -> None:
        """Switch the ``sa_attention`` backend of every layer (``ValueError`` for an unknown name)."""
        if backend not in available_backends():
            raise ValueError(f"unknown `backend` {backend!r}; known: {available_backends()}")
        self.config.attn_backend = backend

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None,
                key_mask: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits ``(B, T, vocab)`` (in the compute dtype) and, with ``targets``, the mean token cross entropy in
        float32 over targets ``!= -100`` (0 if every target is ignored).

        ``cache``: a :class:`KVCache`; ``idx`` then continues the cached tokens (it is updated in place).
        ``key_mask``: bool ``(B, cached + T)``, False at padding tokens, which no query attends to.
        ``doc_ids``: integer ``(B, T)``, the document of each token of packed rows (see
        :func:`sasoftmax.lm.data.document_ids`); a token attends only to earlier tokens of its own document (a dense
        ``(B, 1, T, T)`` mask; not with a cache). Positions stay those of the row (RoPE and ALiBi are relative)."""
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"`idx` must be an integer tensor of shape (B, T), got {got}")
        if idx.shape[1] == 0:
            raise ValueError("`idx` must have at least one token (T >= 1)")
        offset = 0 if cache is None else cache.length
        want = (idx.shape[0], offset + idx.shape[1])
        if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != want):
            raise ValueError(f"`key_mask` must be bool of shape (B, cached + T) = {want}, got {key_mask.dtype} "
                             f"{tuple(key_mask.shape)}")
        doc_mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("`doc_ids` (packed documents) cannot be combined with a KV `cache`")
            if not isinstance(doc_ids, Tensor) or doc_ids.shape != idx.shape or doc_ids.is_floating_point():
                found = tuple(doc_ids.shape) if isinstance(doc_ids, Tensor) else type(doc_ids).__name__
                raise ValueError(f"`doc_ids` must be an integer tensor of the shape of `idx` {tuple(idx.shape)}, "
                                 f"got {found}")
            doc_mask = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        x = self.drop(self.wte(idx))
        for block in self.layers():
            x = block(x, cache, offset, key_mask, doc_mask)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        if not isinstance(targets, Tensor) or targets.shape != idx.shape:
            found = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"`targets` must have the shape of `idx` {tuple(idx.shape)}, got {found}")
        flat = targets.reshape(-1).long()
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=-100, reduction="sum"
        )
        count = (flat != -100).sum().clamp(min=1)
        return logits, loss_sum / count

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Number of (unique) parameters; ``non_embedding`` leaves out the token embedding table (with tied
        embeddings that is also the output head; an untied output head is counted)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
        return n

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on parameters with ``dim >= 2`` (matrices, embeddings) and none on biases,
        LayerNorm gains and per-head positional/normalizer parameters. Fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), fused=fused)
