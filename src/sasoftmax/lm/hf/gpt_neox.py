"""The project's GPT as a standard GPT-NeoX checkpoint (``GPTNeoXForCausalLM``), so that engines with GPT-NeoX model
code serve it: vLLM with the sasoftmax plugin (:mod:`sasoftmax.integrations.vllm`), and transformers itself with
``attn_implementation="sa_softmax"`` — no sasoftmax model code needed.

The mapping is exact, not an approximation. Both are pre-norm decoders with LayerNorm (eps 1e-5), a GELU MLP and
rotate-half RoPE (base 10000) over the whole head, scaled by ``1/sqrt(head_dim)``; GPT-NeoX with
``use_parallel_residual=False`` computes ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` as the GPT does. What
differs is layout: GPT-NeoX's fused projection interleaves q, k, v per head (``(H, 3, D)`` rows) where the GPT
stacks them (``(3, H, D)``); GPT-NeoX always has biases (zeros where the GPT has none) and a separate output matrix
(a copy of the tied embedding). NoPE is GPT-NeoX with ``partial_rotary_factor = 0``.

Not expressible in GPT-NeoX, and refused with a ``ValueError`` naming the field: ALiBi and the learned positional
biases, grouped-query attention (``n_kv_head < n_head``), ``qk_norm``, and normalizers other than softmax and the
SA forms.

The config carries the ``sasoftmax`` block (:data:`sasoftmax.integrations.vllm.CONFIG_KEY`) for SA models; a softmax
model is a plain GPT-NeoX checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...functional import DEFAULT_EPS
from ...integrations.vllm import CONFIG_KEY, sa_options
from ..model import GPT, GPTConfig

__all__ = ["ARCHITECTURE", "gpt_neox_unsupported", "gpt_neox_config", "gpt_neox_state_dict", "save_gpt_neox",
           "SA_BLOCKS"]

ARCHITECTURE = "GPTNeoXForCausalLM"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the GPT uses
ROPE_THETA = 10000.0   # sasoftmax.positional.RoPE's base

SA_BLOCKS: dict[str, dict[str, Any] | None] = {
    "softmax": None,
    "sa_softmax": {"normalizer": "sa_softmax", "eps": DEFAULT_EPS},
    "sa_softmax_detached": {"normalizer": "sa_softmax", "eps": DEFAULT_EPS, "detach_range": True},
    "sa_softmax_plain": {"normalizer": "sa_softmax_plain", "eps": DEFAULT_EPS},
}
"""The ``sasoftmax`` config block per normalizer GPT-NeoX can carry (the detached form has the same forward)."""

_ROTARY = {"rope": 1.0, "nope": 0.0}


def gpt_neox_unsupported(gcfg: GPTConfig) -> str | None:
    """Why ``gcfg`` has no exact GPT-NeoX form (naming the field), or None when it has one."""
    if gcfg.positional not in _ROTARY:
        return (f"positional={gcfg.positional!r}: GPT-NeoX expresses only {sorted(_ROTARY)} (rotary or none); export "
                "with the default format instead")
    if gcfg.kv_heads != gcfg.n_head:
        return f"n_kv_head={gcfg.n_kv_head}: GPT-NeoX has no grouped-query attention (needs n_kv_head = n_head)"
    if gcfg.qk_norm:
        return "qk_norm=True: GPT-NeoX has no normalization of q and k"
    if gcfg.normalizer not in SA_BLOCKS:
        return f"normalizer={gcfg.normalizer!r}: served forms are {sorted(SA_BLOCKS)}"
    return None


def _check(gcfg: GPTConfig) -> None:
    reason = gpt_neox_unsupported(gcfg)
    if reason is not None:
        raise ValueError(f"this model has no GPT-NeoX form: {reason}")


def gpt_neox_config(gcfg: GPTConfig, *, max_position_embeddings: int | None = None,
                    **token_ids: int | None) -> dict[str, Any]:
    """The ``config.json`` of ``gcfg`` as GPT-NeoX (a plain dict; ``token_ids``: ``bos_token_id`` etc.).
    ``max_position_embeddings`` defaults to the training length (RoPE has no table: serving longer is the engine's
    ``max_model_len`` option)."""
    _check(gcfg)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURE], "model_type": "gpt_neox",
        "vocab_size": gcfg.vocab_size, "hidden_size": gcfg.n_embd, "num_hidden_layers": gcfg.n_layer,
        "num_attention_heads": gcfg.n_head, "intermediate_size": 4 * gcfg.n_embd, "hidden_act": "gelu",
        "max_position_embeddings": max_position_embeddings or gcfg.block_size,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA,
                            "partial_rotary_factor": _ROTARY[gcfg.positional]},
        # older transformers read these two flat names
        "rotary_pct": _ROTARY[gcfg.positional], "rotary_emb_base": ROPE_THETA,
        "layer_norm_eps": LAYER_NORM_EPS, "use_parallel_residual": False, "attention_bias": True,
        "tie_word_embeddings": False, "attention_dropout": 0.0, "hidden_dropout": 0.0, "use_cache": True,
        "initializer_range": 0.02, "dtype": "float32",
        **{k: v for k, v in token_ids.items() if v is not None},
    }
    block = SA_BLOCKS[gcfg.normalizer]
    if block is not None:
        sa_options(block)  # the block must be one the serving plugin accepts
        config[CONFIG_KEY] = dict(block)
    return config


def _interleave_qkv(t: Tensor, n_head: int) -> Tensor:
    """``(3*H*D, ...)`` rows ordered (q|k|v, head, d) -> GPT-NeoX's (head, q|k|v, d)."""
    rest = t.shape[1:]
    return t.reshape(3, n_head, -1, *rest).transpose(0, 1).reshape(t.shape)


def gpt_neox_state_dict(model: GPT) -> dict[str, Tensor]:
    """The GPT's weights under GPT-NeoX's checkpoint names (``gpt_neox.*``, ``embed_out.weight``), float32,
    contiguous, sharing no storage (a safetensors file can hold them)."""
    gcfg = model.config
    _check(gcfg)
    C, H = gcfg.n_embd, gcfg.n_head
    out: dict[str, Tensor] = {}

    def put(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
        out[name] = (torch.zeros(shape) if t is None else t.detach().float()).clone().contiguous()

    put("gpt_neox.embed_in.weight", model.wte.weight, (gcfg.vocab_size, C))
    for i, block in enumerate(model.layers()):
        p, attn = f"gpt_neox.layers.{i}.", block.attn
        for ours, theirs in ((block.ln_1, "input_layernorm"), (block.ln_2, "post_attention_layernorm")):
            put(f"{p}{theirs}.weight", ours.weight, (C,))
            put(f"{p}{theirs}.bias", ours.bias, (C,))
        put(f"{p}attention.query_key_value.weight", _interleave_qkv(attn.c_attn.weight, H), (3 * C, C))
        qkv_bias = None if attn.c_attn.bias is None else _interleave_qkv(attn.c_attn.bias, H)
        put(f"{p}attention.query_key_value.bias", qkv_bias, (3 * C,))
        put(f"{p}attention.dense.weight", attn.c_proj.weight, (C, C))
        put(f"{p}attention.dense.bias", attn.c_proj.bias, (C,))
        put(f"{p}mlp.dense_h_to_4h.weight", block.mlp.c_fc.weight, (4 * C, C))
        put(f"{p}mlp.dense_h_to_4h.bias", block.mlp.c_fc.bias, (4 * C,))
        put(f"{p}mlp.dense_4h_to_h.weight", block.mlp.c_proj.weight, (C, 4 * C))
        put(f"{p}mlp.dense_4h_to_h.bias", block.mlp.c_proj.bias, (C,))
    put("gpt_neox.final_layer_norm.weight", model.ln_f.weight, (C,))
    put("gpt_neox.final_layer_norm.bias", model.ln_f.bias, (C,))
    put("embed_out.weight", model.lm_head.weight, (gcfg.vocab_size, C))
    return out


def save_gpt_neox(model: GPT, directory: str | os.PathLike, **token_ids: int | None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of the GPT-NeoX form into ``directory`` (created; an
    existing ``config.json`` / ``model.safetensors`` is replaced, each atomically). Returns ``directory``."""
    from safetensors.torch import save_file

    config = gpt_neox_config(model.config, **token_ids)
    state = gpt_neox_state_dict(model)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    tmp_cfg = path / ".config.json.tmp"
    tmp_cfg.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_cfg, path / "config.json")
    return path
