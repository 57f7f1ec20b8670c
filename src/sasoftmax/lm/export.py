"""From a trained run to a Hugging Face model directory, and back to something to sample from.

:func:`export_checkpoint` (``sasoftmax export --ckpt RUN [--step N] --out DIR``) writes

* ``config.json`` (:class:`sasoftmax.lm.hf.SAGPTConfig`, with an ``auto_map`` to the two small files below) and
  ``model.safetensors`` (the GPT's state dict under ``transformer.``; the tied output head is stored once);
* ``tokenizer.json`` / ``tokenizer_config.json`` that ``AutoTokenizer`` loads (``PreTrainedTokenizerFast``): the run's
  byte-level BPE, or for byte-level runs a 256-token byte vocabulary (id = byte value; the NUL byte stands in as the
  end-of-text token, since such models have none);
* ``generation_config.json`` (greedy by default) and ``configuration_sasoftmax.py`` / ``modeling_sasoftmax.py``,
  which import :mod:`sasoftmax.lm.hf`, so ``from_pretrained(DIR, trust_remote_code=True)`` works wherever sasoftmax
  is installed (and without ``trust_remote_code`` after :func:`sasoftmax.lm.hf.register`);
* ``README.md``: what the model is and how it was trained.

With ``--format gpt-neox`` the model and config are instead a standard ``GPTNeoXForCausalLM`` checkpoint (no model
code of sasoftmax; :mod:`sasoftmax.lm.hf.gpt_neox`) that vLLM serves with the sasoftmax plugin: RoPE or NoPE models
without grouped-query attention or qk-norm.

The directory is written under a temporary name and renamed into place: an export is complete or absent.
:func:`load_for_sampling` opens a run, a checkpoint file or an export with the project's own GPT and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..normalizers import list_normalizers
from ..positional import list_positionals
from .checkpoint import load_run
from .config import TrainConfig
from .data import EOT, BPETokenizer, ByteTokenizer, load_token_data, load_tokenizer
from .model import GPT, GPTConfig

__all__ = ["EXPORT_FORMATS", "export_checkpoint", "load_for_sampling", "sample_text", "model_config", "run_tokenizer",
           "hf_tokenizer", "Loaded", "TOKENIZER_DIR"]

TOKENIZER_DIR = "tokenizer"
"""Where a run directory keeps a copy of its tokenizer (written by the trainer)."""

_SHIM = '''"""A sasoftmax GPT exported by `sasoftmax export`; loading it needs the sasoftmax package."""

from sasoftmax.lm.hf import SAGPTConfig, SAGPTForCausalLM  # noqa: F401
'''


def model_config(state: dict[str, Any], imports: list[str] | tuple[str, ...] = ()) -> GPTConfig:
    """The checkpoint's :class:`GPTConfig`; ``ValueError`` with the ``--import`` hint when it names a normalizer or
    positional encoding that is not registered."""
    try:
        return GPTConfig.from_dict(state["model_config"])
    except ValueError as err:
        cfg = state["model_config"]
        if cfg.get("normalizer") not in list_normalizers() or cfg.get("positional") not in list_positionals():
            seen = f" (imported: {', '.join(imports)})" if imports else ""
            raise ValueError(f"{err}. If it was registered by your own module, pass `--import MODULE` (before the "
                             f"command), so that it is registered here too{seen}") from err
        raise


def run_tokenizer(run_dir: Path, state: dict[str, Any]) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a run trained with: its copy in ``<run>/tokenizer/``, else the token cache of its data config
    (rebuilt from the source if the cache is gone)."""
    if (run_dir / TOKENIZER_DIR / "tokenizer.json").is_file():
        return load_tokenizer(run_dir / TOKENIZER_DIR)
    return load_token_data(TrainConfig.from_dict(state["train_config"]).data).tokenizer()


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_tokenizer(tok: ByteTokenizer | BPETokenizer, max_length: int):
    """The run's tokenizer as a ``transformers.PreTrainedTokenizerFast`` (same ids for the same text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, BPETokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                       pad_token=EOT, model_max_length=max_length)
    chars = _bytes_to_unicode()
    raw = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    nul = chars[0]
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=nul, eos_token=nul, pad_token=nul,
                                   model_max_length=max_length)


def _model_card(gcfg: GPTConfig, state: dict[str, Any], source: Path, format: str = "sasoftmax") -> str:
    train = state.get("train_config", {})
    data = train.get("data", {})
    if format == "gpt-neox":
        impl = {"softmax": "sdpa", "sa_softmax_detached": "sa_softmax"}.get(gcfg.normalizer, gcfg.normalizer)
        usage = [
            "A standard GPT-NeoX checkpoint (exported with `sasoftmax export --format gpt-neox`).", "",
            "```python",
            "import sasoftmax.integrations.hf as sa_hf; sa_hf.register()",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained(DIR, attn_implementation="{impl}")',
            "```", "",
            "Serve it with vLLM and the sasoftmax plugin: `sasoftmax serve DIR` (see docs/serving.md of sasoftmax); "
            "the `sasoftmax` block of config.json tells the plugin the attention form.", "",
        ]
    else:
        usage = [
            "```python",
            "from sasoftmax.lm.hf import register; register()  # the model with transformers' Auto classes",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(DIR)   # or trust_remote_code=True without register()",
            "tokenizer = AutoTokenizer.from_pretrained(DIR)",
            "```", "",
            "No position table: the model runs on sequences longer than its training length.", "",
        ]
    return "\n".join([
        f"# sasoftmax GPT: {gcfg.normalizer}, {gcfg.positional}", "",
        f"A decoder-only GPT trained with [sasoftmax](https://arxiv.org/abs/2502.18277) (attention normalizer "
        f"`{gcfg.normalizer}`, positional encoding `{gcfg.positional}`): {gcfg.n_layer} layers, width {gcfg.n_embd}, "
        f"{gcfg.n_head} heads, vocabulary {gcfg.vocab_size}, trained at length {gcfg.block_size} for "
        f"{state.get('step')} steps on `{data.get('source')}` ({data.get('tokenizer')} tokenizer); exported from "
        f"`{source}`.", "",
        *usage,
    ])


EXPORT_FORMATS = ("sasoftmax", "gpt-neox")
"""``sasoftmax``: the project's own architecture (every normalizer and positional encoding; loading needs sasoftmax).
``gpt-neox``: a standard ``GPTNeoXForCausalLM`` checkpoint (RoPE or NoPE, no GQA, no qk-norm; softmax or SA), which
vLLM serves with the sasoftmax plugin (:mod:`sasoftmax.lm.hf.gpt_neox`)."""


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                      imports: list[str] | tuple[str, ...] = (), format: str = "sasoftmax") -> Path:
    """Write the Hugging Face directory of a run's checkpoint (see the module docstring); returns ``out``.

    ``imports``: modules that register custom normalizers/positional encodings; recorded in the config so that
    loading imports them too. ``format``: one of :data:`EXPORT_FORMATS`. ``FileExistsError`` when ``out`` exists and
    is not empty; ``ValueError`` for a model the format cannot express (naming the field)."""
    from .hf import SAGPTConfig, SAGPTForCausalLM
    from .hf.gpt_neox import gpt_neox_unsupported, save_gpt_neox

    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {list(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory")
    path, state = load_run(ckpt, step)
    gcfg = dataclasses.replace(model_config(state, imports), attn_backend="auto")  # the device's best, wherever loaded
    if format == "gpt-neox" and (reason := gpt_neox_unsupported(gcfg)) is not None:
        raise ValueError(f"--format gpt-neox: this model has no GPT-NeoX form: {reason}")
    tok = run_tokenizer(path.parent, state)
    if tok.vocab_size != gcfg.vocab_size:
        raise ValueError(f"the run's tokenizer has {tok.vocab_size} tokens but the model {gcfg.vocab_size}")
    tokenizer = hf_tokenizer(tok, max_length=16 * gcfg.block_size)
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
    config = SAGPTConfig.from_gpt(gcfg, sasoftmax_imports=list(imports), **token_ids,
                                  auto_map={"AutoConfig": "configuration_sasoftmax.SAGPTConfig",
                                            "AutoModelForCausalLM": "modeling_sasoftmax.SAGPTForCausalLM"})
    model = SAGPTForCausalLM(config)
    model.transformer.load_state_dict(state["model"])
    model.generation_config.do_sample = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if format == "gpt-neox":
            save_gpt_neox(model.transformer, tmp, **token_ids)
            model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
            for name in ("configuration_sasoftmax.py", "modeling_sasoftmax.py"):
                (tmp / name).write_text(_SHIM)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(gcfg, state, path, format))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class Loaded:
    """A model to sample from: the project's GPT (eval mode), its tokenizer, the end-of-text id (or None) and
    where it came from."""

    model: GPT
    tokenizer: Any  # encode(text) -> list[int], decode(ids) -> str
    eos_id: int | None
    source: Path
    step: int | None


class _HFText:
    """``encode`` / ``decode`` of an exported ``tokenizer.json`` (the ``tokenizers`` library, no special tokens)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _is_export(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "sasoftmax_gpt"
    except ValueError:
        return False


def load_for_sampling(source: str | os.PathLike, *, step: int | None = None, device: str = "cpu") -> Loaded:
    """A run directory, a checkpoint file or an exported directory, opened with the project's own model code."""
    path = Path(source)
    if _is_export(path):
        from .hf import SAGPTForCausalLM

        hf_model = SAGPTForCausalLM.from_pretrained(path)
        eos = hf_model.config.eos_token_id
        model = hf_model.transformer
        return Loaded(model.to(device).eval(), _HFText(path / "tokenizer.json"), eos, path, None)
    ckpt_path, state = load_run(path, step)
    model = GPT(model_config(state))
    model.load_state_dict(state["model"])
    tok = run_tokenizer(ckpt_path.parent, state)
    eos = tok.eot_id if isinstance(tok, BPETokenizer) else None
    return Loaded(model.to(device).eval(), tok, eos, ckpt_path, int(state["step"]))


def sample_text(loaded: Loaded, prompt: str, *, max_new_tokens: int = 64, temperature: float = 1.0,
                top_k: int | None = None, seed: int | None = None, max_length: int | None = None) -> str:
    """The prompt's continuation (only the new text). ``max_length`` (default 16 x the training length, the
    longest length the harness evaluates) bounds prompt + new tokens; a longer request is a ``ValueError``."""
    from .generate import generate

    ids = loaded.tokenizer.encode(prompt)
    if not ids:
        if loaded.eos_id is None:
            raise ValueError("--prompt is empty and the model has no end-of-text token to start from")
        ids = [loaded.eos_id]
    limit = max_length if max_length is not None else 16 * loaded.model.config.block_size
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"--prompt has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that exceeds the "
                         f"model's limit of {limit} tokens (--max-length; the model trained at "
                         f"{loaded.model.config.block_size})")
    device = next(loaded.model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(loaded.model, idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   eos_id=loaded.eos_id)
    new = out[0, len(ids):].tolist()
    if loaded.eos_id is not None and loaded.eos_id in new:
        new = new[: new.index(loaded.eos_id)]
    return loaded.tokenizer.decode(new)
