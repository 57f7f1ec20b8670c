"""``sasoftmax export --format gpt-neox``: the project's GPT as a standard GPTNeoXForCausalLM checkpoint. Logits of
transformers' own GPT-NeoX code (with the matching attention) must equal the project's model; what GPT-NeoX cannot
express is refused naming the field. Serving the export with vLLM is tested in tests/serve."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import sasoftmax.integrations.hf as sa_hf
from sasoftmax.integrations.vllm import sa_options
from sasoftmax.lm.cli import main
from sasoftmax.lm.export import load_for_sampling
from sasoftmax.lm.hf.gpt_neox import gpt_neox_state_dict, save_gpt_neox
from sasoftmax.lm.model import GPT, GPTConfig
from tests.lm.test_export import _run_dir

sa_hf.register()

IMPLEMENTATION = {"softmax": "sdpa", "sa_softmax": "sa_softmax", "sa_softmax_detached": "sa_softmax",
                  "sa_softmax_plain": "sa_softmax_plain"}


def _gpt(normalizer: str, positional: str, bias: bool, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32, normalizer=normalizer,
                          positional=positional, bias=bias, tie_embeddings=not bias)).eval()
    with torch.no_grad():  # every weight and bias away from its init (zero biases, unit gains would hide a swap)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _neox(path, normalizer: str) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=IMPLEMENTATION[normalizer], dtype=torch.float32).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("positional", ["rope", "nope"])
@pytest.mark.parametrize("normalizer", sorted(IMPLEMENTATION))
def test_gpt_neox_logits_equal_the_project_model(tmp_path, normalizer, positional, bias):
    ours = _gpt(normalizer, positional, bias)
    theirs = _neox(save_gpt_neox(ours, tmp_path / "neox"), normalizer)
    assert type(theirs).__name__ == "GPTNeoXForCausalLM"
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))  # past the training length
    with torch.no_grad():
        want = ours(idx)[0]
        torch.testing.assert_close(theirs(idx).logits, want, rtol=1e-5, atol=1e-5)
        if normalizer != "softmax":  # the comparison can tell SA from softmax
            other = _neox(tmp_path / "neox", "softmax")
            assert (other(idx).logits - want).abs().max() > 1e-2


def test_the_config_block_and_the_layout(tmp_path):
    model = _gpt("sa_softmax_detached", "rope", bias=False)
    config = json.loads((save_gpt_neox(model, tmp_path / "d") / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["use_parallel_residual"] is False
    assert sa_options(config["sasoftmax"]) == {"normalize": True, "eps": pytest.approx(1e-10)}
    assert config["sasoftmax"]["detach_range"] is True
    assert "sasoftmax" not in json.loads((save_gpt_neox(_gpt("softmax", "rope", False), tmp_path / "s")
                                          / "config.json").read_text())
    state = gpt_neox_state_dict(model)
    assert "embed_out.weight" in state and state["embed_out.weight"].data_ptr() != \
        state["gpt_neox.embed_in.weight"].data_ptr()
    # q, k, v interleaved per head: head 1's query rows follow head 0's value rows
    qkv, D = model.blocks[0].attn.c_attn.weight, 8
    neox = state["gpt_neox.layers.0.attention.query_key_value.weight"]
    torch.testing.assert_close(neox[3 * D:4 * D], qkv[D:2 * D])                  # head 1, q
    torch.testing.assert_close(neox[2 * D:3 * D], qkv[2 * 32:2 * 32 + D])        # head 0, v
    assert torch.count_nonzero(state["gpt_neox.layers.0.attention.dense.bias"]) == 0


@pytest.mark.parametrize(("changes", "field"), [
    ({"positional": "alibi"}, "positional='alibi'"),
    ({"n_kv_head": 2}, "n_kv_head=2"),
    ({"qk_norm": True}, "qk_norm=True"),
    ({"normalizer": "softpick"}, "normalizer='softpick'"),
])
def test_what_gpt_neox_cannot_express_is_refused(tmp_path, changes, field):
    gcfg = {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 4, "n_embd": 32, **changes}
    with pytest.raises(ValueError, match=f"no GPT-NeoX form: {field}".replace("(", r"\(")):
        save_gpt_neox(GPT(GPTConfig(**gcfg)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_command_writes_a_gpt_neox_directory(tmp_path, capsys):
    run = _run_dir(tmp_path, "sa_softmax", "rope", n_kv_head=None)
    out = tmp_path / "neox"
    assert main(["export", "--ckpt", str(run), "--out", str(out), "--format", "gpt-neox"]) == 0
    assert "sasoftmax serve" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "modeling_sasoftmax.py").exists()
    ours = load_for_sampling(run).model
    theirs = _neox(out, "sa_softmax")
    idx = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
    # generate() through transformers' GPT-NeoX with its KV cache equals the project's greedy sampler
    from sasoftmax.lm.generate import generate

    prompt = torch.tensor([[5, 6, 7]])
    want = generate(ours, prompt, 12, temperature=0.0)
    got = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False)
    assert got.tolist() == want.tolist()
    gqa = _run_dir(tmp_path / "gqa", "sa_softmax", "rope")  # the helper's default: 2 key/value heads
    assert main(["export", "--ckpt", str(gqa), "--out", str(tmp_path / "g"), "--format", "gpt-neox"]) == 2
    assert "n_kv_head=2" in capsys.readouterr().err
