"""The part of the vLLM integration that needs no vLLM: the `sasoftmax` config block and `sasoftmax mark-sa`.
(Serving itself is tested in tests/serve, in .venv-serve.)"""

from __future__ import annotations

import json

import pytest

from sasoftmax.integrations.vllm import mark_sa, sa_options
from sasoftmax.lm.cli import main


def test_block_validation_and_mark_sa(tmp_path):
    assert sa_options(None) is None
    assert sa_options({"normalizer": "sa_softmax_plain", "eps": 0.0}) == {"normalize": False, "eps": 0.0}
    with pytest.raises(ValueError, match="eps"):
        sa_options({"eps": float("nan")})
    with pytest.raises(ValueError, match="fields"):
        sa_options({"window": 3})
    with pytest.raises(ValueError, match="config.json"):
        mark_sa(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    mark_sa(tmp_path, "sa_softmax_plain")
    assert json.loads((tmp_path / "config.json").read_text())["sasoftmax"]["normalizer"] == "sa_softmax_plain"


def test_mark_sa_command(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert main(["mark-sa", str(tmp_path)]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["sasoftmax"] == {"normalizer": "sa_softmax", "eps": 1e-10} and cfg["hidden_size"] == 8
    assert "sa_softmax" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["mark-sa", str(tmp_path), "--normalizer", "softpick"])


def test_serve_command_without_vllm(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert main(["serve", str(tmp_path)]) == 2
    assert "not installed" in capsys.readouterr().err


def test_serve_selects_the_custom_backend_for_sa_models_on_cuda(tmp_path, monkeypatch):
    import torch

    from sasoftmax.integrations.vllm import is_sa_model
    from sasoftmax.lm.cli import _needs_custom_backend

    plain, sa = tmp_path / "plain", tmp_path / "sa"
    for d in (plain, sa):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    mark_sa(sa)
    assert is_sa_model(sa) and not is_sa_model(plain) and not is_sa_model(tmp_path / "missing")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _needs_custom_backend(str(sa), ["--port", "8000"])
    assert not _needs_custom_backend(str(plain), [])
    assert not _needs_custom_backend(str(sa), ["--attention-backend", "CUSTOM"])  # already chosen
    with pytest.raises(ValueError, match="only the CUSTOM backend"):  # another backend would serve softmax
        _needs_custom_backend(str(sa), ["--attention-backend", "TRITON_ATTN"])
    with pytest.raises(ValueError, match="FLASH_ATTN"):
        _needs_custom_backend(str(sa), ["--attention-backend=FLASH_ATTN"])
    assert not _needs_custom_backend(str(plain), ["--attention-backend", "FLASH_ATTN"])
    assert not _needs_custom_backend(str(sa), ["--device", "cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _needs_custom_backend(str(sa), [])
