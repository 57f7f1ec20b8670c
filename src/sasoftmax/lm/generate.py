"""Text from a GPT: greedy decoding or sampling with temperature and top-k, through the model's KV cache.

The sampling rule is the one of Hugging Face ``generate(do_sample=True, temperature=T, top_k=K)`` (float32 logits of
the last position, divided by ``T``, all but the ``K`` largest set to ``-inf``, softmax, ``torch.multinomial``), so
an exported model sampled by transformers from ``torch.manual_seed(s)`` draws the same tokens as :func:`generate`
with ``seed=s``. ``temperature=0`` is greedy (argmax).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import GPT, KVCache

__all__ = ["generate", "next_token"]


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """The next token ``(B,)`` from last-position logits ``(B, vocab)``."""
    scores = logits.float()
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: GPT, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None, eos_id: int | None = None, use_cache: bool = True) -> Tensor:
    """``idx (B, T)`` followed by up to ``max_new_tokens`` new tokens, ``(B, T + n)``.

    Stops early once every row has produced ``eos_id`` (rows that stopped earlier are padded with it). ``seed`` fixes
    the sampling (a private generator; the global RNG is not touched). ``use_cache=False`` recomputes the whole
    sequence every step (the same tokens, slower)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be a non-negative int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 or None = no limit), got {top_k}")
    gen = None if seed is None else torch.Generator(device=idx.device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    cache = KVCache() if use_cache else None
    out, done = idx, torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    try:
        logits, _ = model(idx, cache=cache)
        for i in range(max_new_tokens):
            tok = next_token(logits[:, -1, :], temperature, top_k, gen)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done |= tok == eos_id
            out = torch.cat([out, tok[:, None]], dim=1)
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits, _ = model(tok[:, None], cache=cache) if cache is not None else model(out)
    finally:
        model.train(was_training)
    return out
