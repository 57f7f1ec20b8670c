"""``torch.compile(fullgraph=True)`` through ``sa_attention`` on the CPU: no graph break, and the compiled function
gives eager's values and gradients (fused kernel and chunked backend, every variant, masks, bias, ALiBi, GQA,
dropout), and a compiled tiny GPT training step gives eager's step.

Each compilation takes 10-30 s on a 2-core CPU, so one compiled function covers many calls at once."""

from __future__ import annotations

import copy

import pytest
import torch
from support.helpers import qkv

from sasoftmax import sa_attention
from sasoftmax.attention.backends import cpp as cpp_backend

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")


@pytest.fixture
def eager_random():
    """Compiled random ops draw what eager draws (dropout seeds come from torch.randint in the graph)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


def _variants(q, k, v, kg, vg, bias, keep, fmask, slopes):
    """Several sa_attention calls, each exercising other options; returns their outputs."""
    return (
        sa_attention(q, k, v, keep, bias=bias, is_causal=True),  # auto -> cpp: bool mask, bias with gradient
        sa_attention(q, k, v, fmask, alibi_slopes=slopes, normalize=False, backend="cpp"),  # float mask, ALiBi
        sa_attention(q, kg, vg, is_causal=True, detach_range=True, backend="cpp"),  # GQA, detached range
        sa_attention(q, kg, vg, keep, dropout_p=0.25, backend="cpp"),  # dropout
        sa_attention(q, k, v, bias=bias, dropout_p=0.25, normalize=False, backend="chunked"),  # the other op backend
        sa_attention(q, kg, vg, fmask, is_causal=True, alibi_slopes=slopes, backend="chunked"),
    )


def test_compiled_attention_matches_eager(eager_random):
    torch._dynamo.reset()
    q, k, v = qkv(2, 4, 4, 12, 12, 8, 8, dtype=torch.float32, seed=1)
    _, kg, vg = qkv(2, 4, 2, 12, 12, 8, 8, dtype=torch.float32, seed=2)
    bias = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    keep = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(4)) > 0.2
    fmask = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(5)).masked_fill(~keep, float("-inf"))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    leaves = [q, k, v, kg, vg, bias]
    args = (*leaves, keep, fmask, slopes)
    compiled = torch.compile(_variants, fullgraph=True)
    results = {}
    for name, fn in (("compiled", compiled), ("eager", _variants)):
        torch.manual_seed(11)
        outs = fn(*args)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        results[name] = [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))
    for i, (a, b) in enumerate(zip(results["compiled"], results["eager"], strict=True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, i=i: f"result {i}: {m}")


def test_compiled_gpt_training_step_matches_eager(eager_random):
    """A tiny SA-Softmax GPT (ALiBi, grouped-query attention, dropout): loss, every gradient and the parameters after
    one AdamW step agree between ``torch.compile(model, fullgraph=True)`` and eager."""
    from sasoftmax.lm.model import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=16,
                                normalizer="sa_softmax", positional="alibi", dropout=0.1)
    eager = GPT(cfg)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for net, params in ((compiled, model.parameters()), (eager, eager.parameters())):
        opt = torch.optim.AdamW(params, lr=1e-2)
        torch.manual_seed(7)
        _, loss = net(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")
        # (AdamW divides by sqrt(v): near-zero gradients turn rounding-level differences into ~lr * 1e-4)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"param {n}: {m}")
    assert cpp_backend.load_error() is None  # the model ran the fused kernel (auto on CPU)


def test_backend_selection_constant_matches_torch_decorator():
    """``load_error`` is marked the way ``torch.compiler.assume_constant_result`` marks a function (the package sets
    the marker itself so that importing it does not import ``torch._dynamo``); if torch changes what the decorator
    does, this fails before compiled models start breaking their graphs."""
    def probe() -> int:
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert dict(vars(marked)) == {"_dynamo_marked_constant": True}
    assert cpp_backend.load_error._dynamo_marked_constant is True


def test_import_does_not_load_dynamo():
    import subprocess
    import sys

    code = "import sys, sasoftmax, sasoftmax.nn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_first_call_inside_compile_in_a_fresh_process():
    """``torch.compile`` cannot trace an import: the backend modules must be loaded before the first traced call
    (the registry preloads them), or a user's first compiled forward breaks its graph."""
    import subprocess
    import sys

    code = ("import torch, sasoftmax\n"
            "q = torch.randn(1, 2, 8, 16)\n"
            "f = torch.compile(lambda q: sasoftmax.sa_attention(q, q, q, is_causal=True), fullgraph=True)\n"
            "print(float((f(q) - sasoftmax.sa_attention(q, q, q, is_causal=True)).abs().max()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip()) == 0.0
