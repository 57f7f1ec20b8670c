"""Serving SA models with vLLM (sasoftmax.integrations.vllm). These run in .venv-serve (vLLM pins an older
transformers than the main stack): ``bash scripts/test.sh`` sets it up and runs this folder there.

Greedy tokens from vLLM must equal transformers' ``generate`` with ``attn_implementation="sa_softmax"`` (or
``"sdpa"`` for a model without the ``sasoftmax`` block). Random tiny models with ``initializer_range=0.5`` have
peaked logits, so equal greedy tokens are a sharp test: the SA and softmax token streams differ."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers

from sasoftmax.integrations.vllm import mark_sa

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
NEW_TOKENS = 16
# the last prompt spans more than one cache block (vLLM's CPU block size is a multiple of 32; 128 here)
PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 50)), [7] * 13, list(range(100, 200, 3)),
           [(5 * i) % 250 for i in range(150)]]
VOCAB = 256


def _tiny(kind: str, path: Path, seed: int = 0) -> Path:
    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "initializer_range": 0.5}
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=32, **common))
    elif kind == "mistral":  # a sliding window shorter than most prompts
        model = transformers.MistralForCausalLM(transformers.MistralConfig(head_dim=32, sliding_window=12, **common))
    elif kind == "gemma2":  # soft-capped attention logits, alternating sliding-window and global layers
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            head_dim=32, sliding_window=12, attn_logit_softcapping=2.0, final_logit_softcapping=None,
            query_pre_attn_scalar=32, **common))
        with torch.no_grad():  # Gemma scales embeddings by sqrt(width); smaller ones let attention steer the tokens
            model.model.embed_tokens.weight.mul_(0.1)
    else:
        # heads of 32 (vLLM's CPU kernels start at 32), 2 query heads per key/value head
        common.update(num_attention_heads=2, num_key_value_heads=1)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model.save_pretrained(path)
    return path


def _hf_tokens(path: Path, impl: str) -> list[list[int]]:
    import sasoftmax.integrations.hf as sa_hf

    sa_hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl,
                                                              dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(g[0, len(p):].tolist())
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _vllm_tokens(path: Path, extra: dict | None = None) -> list[list[int]]:
    cmd = [sys.executable, str(HERE / "vllm_run.py"), str(path), json.dumps(PROMPTS), str(NEW_TOKENS),
           json.dumps(extra or {})]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode == 0, res.stderr[-4000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("TOKENS ")][-1]
    return json.loads(line[len("TOKENS "):])


@pytest.mark.parametrize(("kind", "normalizer", "extra"), [
    ("llama", "sa_softmax", {"max_num_batched_tokens": 32}),  # prompts over 32 tokens take chunked prefill
    ("llama", "sa_softmax_plain", {}),
    ("qwen2", "sa_softmax", {}),
])
def test_greedy_tokens_equal_transformers(tmp_path, kind, normalizer, extra):
    path = _tiny(kind, tmp_path / kind)
    mark_sa(path, normalizer)
    want = _hf_tokens(path, "sa_softmax" if normalizer == "sa_softmax" else "sa_softmax_plain")
    assert want != _hf_tokens(path, "sdpa")  # the test can tell SA from softmax
    assert _vllm_tokens(path, extra) == want


def _project_gpt(normalizer: str):
    """The project's own GPT (RoPE, heads of 32), random weights scaled to std ~0.5 so that logits are peaked."""
    from sasoftmax.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=256, n_layer=2, n_head=4, n_embd=128,
                          normalizer=normalizer, positional="rope")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(25.0)
    return model


def _project_tokens(model) -> list[list[int]]:
    """Greedy tokens of the project's sampler (what ``sasoftmax sample --temperature 0`` runs)."""
    from sasoftmax.lm.generate import generate

    return [generate(model, torch.tensor([p]), NEW_TOKENS, temperature=0.0)[0, len(p):].tolist() for p in PROMPTS]


def test_our_gpt_exported_as_gpt_neox_is_served_like_the_project_sampler(tmp_path):
    """`sasoftmax export --format gpt-neox` of the project's GPT: vLLM serves it (its GPT-NeoX model code, SA
    attention from the plugin) with the same greedy tokens as the project's own sampler."""
    from sasoftmax.lm.hf.gpt_neox import save_gpt_neox

    model = _project_gpt("sa_softmax")
    path = save_gpt_neox(model, tmp_path / "neox")
    want = _project_tokens(model)
    softmax = _project_gpt("softmax")
    softmax.load_state_dict(model.state_dict())
    assert want != _project_tokens(softmax)  # the test can tell SA from softmax
    assert _vllm_tokens(path, {"max_num_batched_tokens": 64}) == want


@pytest.mark.parametrize(("kind", "feature", "off"), [
    ("mistral", "sliding_window", None),          # a 12-token window, prompts of up to 150 tokens
    ("gemma2", "attn_logit_softcapping", None),   # soft-capped logits (and alternating 12-token windows)
    ("gemma2", "sliding_window", 4096),
])
def test_windows_and_soft_capping_are_served(tmp_path, kind, feature, off):
    path = _tiny(kind, tmp_path / kind, seed=1)
    mark_sa(path)
    want = _hf_tokens(path, "sa_softmax")
    assert want != _hf_tokens(path, "sdpa")
    # the feature changes the tokens, so a backend that dropped it would fail
    plain = tmp_path / f"{kind}_without"
    shutil.copytree(path, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg[feature] = off
    (plain / "config.json").write_text(json.dumps(cfg))
    assert _hf_tokens(plain, "sa_softmax") != want
    assert _vllm_tokens(path) == want


def test_model_without_the_block_is_served_as_before(tmp_path):
    path = _tiny("llama", tmp_path / "plain")
    assert _vllm_tokens(path) == _hf_tokens(path, "sdpa")


def test_unservable_block_fails_at_load_time(tmp_path):
    path = _tiny("llama", tmp_path / "bad")
    cfg = json.loads((path / "config.json").read_text())
    cfg["sasoftmax"] = {"normalizer": "softpick"}
    (path / "config.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, str(HERE / "vllm_run.py"), str(path), json.dumps(PROMPTS[:1]), "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode != 0 and "TOKENS" not in res.stdout
    log = res.stdout + res.stderr  # (vLLM logs the engine's error to stdout)
    assert "sasoftmax.normalizer" in log and "softpick" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _word_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the model's vocabulary (w0 ... w255), so the server can detokenize."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def test_openai_server_returns_the_same_tokens(tmp_path):
    path = _tiny("llama", tmp_path / "served")
    _word_tokenizer(path)
    mark_sa(path)
    want = _hf_tokens(path, "sa_softmax")
    port = _free_port()
    cmd = [sys.executable, "-m", "sasoftmax", "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, server.stderr.read()[-4000:] if server.stderr else "server exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up in 300 s"
                time.sleep(1)
        for prompt, tokens in zip(PROMPTS[:2], want[:2], strict=True):
            body = json.dumps({"model": str(path), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0,
                               "ignore_eos": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            text = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["text"]
            assert text.split() == [f"w{t}" for t in tokens]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode is not None
