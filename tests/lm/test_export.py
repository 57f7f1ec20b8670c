"""From a trained model to transformers, generate() and lm-evaluation-harness: export, sampling, KV cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sasoftmax.lm.checkpoint import CheckpointError, save_checkpoint
from sasoftmax.lm.cli import main
from sasoftmax.lm.config import TrainConfig
from sasoftmax.lm.data import ByteTokenizer, load_tokenizer
from sasoftmax.lm.export import export_checkpoint, load_for_sampling, sample_text
from sasoftmax.lm.generate import generate
from sasoftmax.lm.hf import register
from sasoftmax.lm.model import GPT, GPTConfig, KVCache
from sasoftmax.normalizers import list_normalizers
from sasoftmax.positional import list_positionals

register()  # the exported model with transformers' Auto classes (the documented explicit call)

BUILTIN_NORMALIZERS = ["softmax", "sa_softmax", "sa_softmax_plain", "sa_softmax_detached", "softmax_plus_one",
                       "sigmoid", "ssmax", "softpick", "stablemax"]
POSITIONALS = ["nope", "rope", "alibi", "kerple_log", "kerple_power", "fire"]
ROOT = Path(__file__).resolve().parents[2]


def _run_dir(tmp: Path, normalizer: str = "sa_softmax", positional: str = "rope", seed: int = 0, step: int = 7,
             **model: object) -> Path:
    """A run directory with a checkpoint of a tiny byte-level GPT (random weights) and its tokenizer."""
    torch.manual_seed(seed)
    fields = {"vocab_size": 256, "block_size": 16, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
              "normalizer": normalizer, "positional": positional, **model}
    gcfg = GPTConfig(**fields)  # type: ignore[arg-type]
    model = GPT(gcfg)
    with torch.no_grad():  # make the learnable positional / normalizer parameters differ from their init
        for name, p in model.named_parameters():
            if "pos." in name or "ssmax" in name:
                p.mul_(1.3)
    run = tmp / f"run_{normalizer}_{positional}"
    cfg = TrainConfig()
    cfg.data.tokenizer = "bytes"
    save_checkpoint(run, step, {"model": model.state_dict(), "model_config": gcfg.to_dict(),
                                "train_config": cfg.to_dict(), "step": step})
    ByteTokenizer().save(_mkdir(run / "tokenizer"))
    return run


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _project_model(run: Path) -> GPT:
    return load_for_sampling(run).model


def test_every_builtin_entry_is_covered():
    assert set(BUILTIN_NORMALIZERS) <= set(list_normalizers()) and set(POSITIONALS) <= set(list_positionals())


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("normalizer", BUILTIN_NORMALIZERS)
def test_export_round_trip(tmp_path, normalizer, positional):
    """Logits equal the project's model (with and without a KV cache); cached greedy generate() equals uncached
    and the project's sampler; sampling with a seed draws the same tokens."""
    from transformers import AutoModelForCausalLM

    run = _run_dir(tmp_path, normalizer, positional)
    out = export_checkpoint(run, tmp_path / "export")
    ours = _project_model(run)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(idx)[0]
        torch.testing.assert_close(theirs(idx).logits, ref, rtol=1e-5, atol=1e-5)
        first = theirs(idx[:, :7], use_cache=True)
        rest = theirs(idx[:, 7:], **{_cache_kw(first): _cache_of(first)}, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), ref, rtol=1e-5, atol=1e-5)
    cached = theirs.generate(idx, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = theirs.generate(idx, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, generate(ours, idx, 6, temperature=0))
    torch.manual_seed(3)
    sampled = theirs.generate(idx, max_new_tokens=6, do_sample=True, temperature=0.9, top_k=20, top_p=1.0)
    assert torch.equal(sampled, generate(ours, idx, 6, temperature=0.9, top_k=20, seed=3))


def test_export_round_trip_with_qk_norm(tmp_path):
    from transformers import AutoModelForCausalLM

    run = _run_dir(tmp_path, "sa_softmax", "alibi", qk_norm=True, qk_norm_type="rmsnorm")
    out = export_checkpoint(run, tmp_path / "export")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.config.qk_norm is True and theirs.config.qk_norm_type == "rmsnorm"
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, _project_model(run)(idx)[0], rtol=1e-5, atol=1e-5)


def _cache_of(output) -> object:
    return getattr(output, "cache", None) or output.past_key_values


def _cache_kw(output) -> str:
    return "cache" if getattr(output, "cache", None) is not None else "past_key_values"


def test_kv_cache_and_left_padding_in_the_project_model():
    """Decoding token by token equals the full forward; a left-padded row equals the unpadded one (RoPE)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, positional="rope",
                          normalizer="sa_softmax")).eval()
    idx = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache()
        steps = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
        torch.testing.assert_close(model(padded, key_mask=mask)[0][:, 3:], full, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="key_mask"):
            model(idx, key_mask=mask)


def test_trust_remote_code_in_a_fresh_process_and_save_load_save(tmp_path):
    """Stock transformers with trust_remote_code=True (no `import sasoftmax` by the user) gives the same logits;
    loading and saving again reproduces the weights and the config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = _run_dir(tmp_path, "sa_softmax", "fire")
    out = export_checkpoint(run, tmp_path / "export")
    idx = [[5, 17, 99, 3, 250, 42]]
    ref = _project_model(run)(torch.tensor(idx))[0]
    code = ("import json, sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
            f"print(json.dumps(m(torch.tensor({idx})).logits.tolist()))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(res.stdout.strip().splitlines()[-1])), ref, rtol=1e-5,
                               atol=1e-5)
    again = tmp_path / "again"
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(again)
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (out, again))
    assert ca == cb


def test_tokenizers_match_the_runs(tmp_path):
    """AutoTokenizer of an export gives the run tokenizer's ids: byte level, and BPE from a trained run."""
    from transformers import AutoTokenizer

    text = "Paragraph 7: the cat sat on mat 7 — and looked at the dog.\n"
    run = _run_dir(tmp_path)
    out = export_checkpoint(run, tmp_path / "bytes")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(text, add_special_tokens=False).input_ids == ByteTokenizer().encode(text)
    assert tok.decode(ByteTokenizer().encode(text)) == text
    trained = _trained_run(tmp_path)
    out = export_checkpoint(trained, tmp_path / "bpe")
    tok, ours = AutoTokenizer.from_pretrained(out), load_tokenizer(trained / "tokenizer")
    assert tok(text, add_special_tokens=False).input_ids == ours.encode(text)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ours.eot_id


def _trained_run(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Paragraph {i}: the cat sat on mat {i % 17} and looked at the dog {i % 5}.\n"
                              for i in range(2000)))
    sets = [f"data.source={corpus}", "data.tokenizer=bpe", "data.vocab_size=300", "data.doc_chars=4000",
            f"data.cache_dir={tmp_path / 'cache'}", "max_steps=4", "model.n_layer=1", "model.n_embd=32",
            "model.block_size=16", "batch_size=2", "eval_batches=1", f"out_dir={tmp_path / 'trained'}"]
    assert main(["train", "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    return tmp_path / "trained"


def test_sample_command_from_a_run_and_from_its_export(tmp_path, capsys):
    run = _trained_run(tmp_path)
    capsys.readouterr()
    args = ["--prompt", "Paragraph 3: the cat", "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "10",
            "--seed", "4"]
    assert main(["sample", "--ckpt", str(run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(tmp_path / "x"), *args]) == 0
    assert capsys.readouterr().out == from_run and from_run.startswith("Paragraph 3: the cat")
    greedy = sample_text(load_for_sampling(run), "Paragraph 3", max_new_tokens=5, temperature=0)
    assert greedy == sample_text(load_for_sampling(run), "Paragraph 3", max_new_tokens=5, temperature=0)


def test_an_old_run_without_a_tokenizer_copy_exports_from_its_token_cache(tmp_path):
    run = _trained_run(tmp_path)
    for f in (run / "tokenizer").iterdir():
        f.unlink()
    (run / "tokenizer").rmdir()
    out = export_checkpoint(run, tmp_path / "x")
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())["vocab_size"] == 300


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        export_checkpoint(tmp_path / "empty_run", tmp_path / "x")
    assert main(["sample", "--ckpt", str(tmp_path / "empty_run"), "--prompt", "hi"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    run = _run_dir(tmp_path)
    from sasoftmax.lm.checkpoint import load_checkpoint

    state = load_checkpoint(run / "ckpt_000007.pt")
    state["model_config"]["normalizer"] = "my_private_softmax"
    save_checkpoint(tmp_path / "custom", 1, state)
    with pytest.raises(ValueError, match="--import MODULE"):
        export_checkpoint(tmp_path / "custom", tmp_path / "y")
    loaded = load_for_sampling(run)
    with pytest.raises(ValueError, match="exceeds the model's limit of 256 tokens"):
        sample_text(loaded, "x" * 250, max_new_tokens=10)
    with pytest.raises(ValueError, match="--prompt is empty"):
        sample_text(loaded, "", max_new_tokens=10)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def _task_dir(tmp_path: Path) -> Path:
    tasks = _mkdir(tmp_path / "tasks")
    (tasks / "tiny.jsonl").write_text(
        '{"question": "Paragraph 12: the cat sat on", "choices": [" mat", " dog"], "answer": 0}\n'
        '{"question": "Paragraph 13: the cat looked at the", "choices": [" dog", " mat"], "answer": 0}\n')
    (tasks / "tiny.yaml").write_text(
        "task: sasoftmax_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


def test_lm_eval_harness_on_an_export_and_through_the_shortcut(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = _trained_run(tmp_path)
    tasks = _task_dir(tmp_path)
    out = export_checkpoint(run, tmp_path / "export")
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True", "--tasks", "sasoftmax_tiny", "--include_path", str(tasks),
           "--device", "cpu", "--batch_size", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sasoftmax_tiny" in res.stdout and "acc" in res.stdout
    capsys.readouterr()
    assert main(["lm-eval", "--ckpt", str(run), "--tasks", "sasoftmax_tiny", "--include-path", str(tasks)]) == 0
    assert "sasoftmax_tiny" in capsys.readouterr().out
    record = json.loads((run / "lm_eval.json").read_text())
    acc = record["results"]["sasoftmax_tiny"]["acc,none"]
    assert record["step"] == 4 and acc in (0.0, 0.5, 1.0)


def test_the_shipped_zero_shot_suite_reads():
    from sasoftmax.lm.downstream import read_suite

    suite = read_suite(ROOT / "configs" / "lm_eval" / "zero_shot.toml")
    assert {"lambada_openai", "piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande"} <= set(suite["tasks"])
    assert suite["num_fewshot"] == 0


def test_a_bad_suite_file_names_the_key(tmp_path):
    from sasoftmax.lm.config import ConfigError
    from sasoftmax.lm.downstream import read_suite

    (tmp_path / "s.toml").write_text('tasks = ["piqa"]\nshots = 3\n')
    with pytest.raises(ConfigError, match="shots"):
        read_suite(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text("tasks = []\n")
    with pytest.raises(ConfigError, match="tasks"):
        read_suite(tmp_path / "s.toml")
