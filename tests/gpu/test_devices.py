"""The model stack on every available device: each normalizer trains, and its CUDA run agrees with the CPU run.

On a machine without CUDA only the ``cpu`` cases run (they check the test logic and the CPU path); on a GPU machine
(``scripts/gpu_check.sh`` runs this file) the ``cuda`` cases run the same checks on the GPU, where ``backend="auto"``
sends the SA normalizers through the fused Triton kernel and ``softmax`` through SDPA's flash path.
"""

from __future__ import annotations

import math

import pytest
import torch

from sasoftmax.lm.diagnostics import attention_diagnostics
from sasoftmax.lm.model import GPT, GPTConfig
from sasoftmax.normalizers import list_normalizers

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                               pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])]
NORMALIZERS = [n for n in list_normalizers() if not n.startswith("test_")]
VOCAB = 97


def _model(normalizer: str, positional: str, device: str) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    normalizer=normalizer, positional=positional)
    return GPT(cfg).to(device)


def _batch(device: str, t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, t + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_every_normalizer_trains_on_device(normalizer: str, device: str) -> None:
    """Five AdamW steps in float32 reduce the loss on a fixed batch; gradient diagnostics are finite."""
    model = _model(normalizer, "alibi", device)
    x, y = _batch(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        _, loss = model(x, y)
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    diag = attention_diagnostics(model, x, y)
    assert diag and all(math.isfinite(v) for v in diag.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalizer", ["softmax", "sa_softmax", "sa_softmax_plain", "ssmax"])
@pytest.mark.parametrize("positional", ["rope", "kerple_log", "fire"])
def test_bf16_autocast_step_matches_float32(normalizer: str, positional: str, device: str) -> None:
    """Under bfloat16 autocast the loss stays within bf16 rounding of the float32 loss."""
    model = _model(normalizer, positional, device)
    x, y = _batch(device, t=48)  # longer than block_size: extrapolation path
    with torch.no_grad():
        ref = float(model(x, y)[1])
        with torch.autocast(device, dtype=torch.bfloat16):
            low = float(model(x, y)[1])
    assert abs(low - ref) < 0.05 * abs(ref), (low, ref)
    with torch.autocast(device, dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_cuda_matches_cpu(normalizer: str) -> None:
    """The same model and batch give the same loss and gradients on CUDA (fused kernels) and on the CPU."""
    results = {}
    for device in ("cpu", "cuda"):
        model = _model(normalizer, "alibi", device)
        x, y = _batch(device)
        _, loss = model(x, y)
        loss.backward()
        results[device] = (float(loss), {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                                         if p.grad is not None})
    (l_cpu, g_cpu), (l_gpu, g_gpu) = results["cpu"], results["cuda"]
    assert abs(l_cpu - l_gpu) < 1e-4 * max(1.0, abs(l_cpu))
    for name, g in g_cpu.items():
        torch.testing.assert_close(g_gpu[name], g, rtol=2e-3, atol=2e-5, msg=name)
