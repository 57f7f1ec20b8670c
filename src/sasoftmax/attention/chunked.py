"""The memory-efficient backend: query blocks over whole key rows, with the analytic backward of ``design/math.md``.

Each block of query rows sees all of its keys, so softmax, min and max are exact per block. The forward keeps only
per-row statistics (log-sum-exp, and for the normalized form ``a``, ``c`` and the arg-min/arg-max keys); the backward
recomputes each block's scores. Activation memory is O(N * D) plus one block of scores at a time.

Gradients (per row, ``g = dL/do``, ``dP_j = g . v_j`` (times the dropout scale), ``Delta = g . o``):

* plain:       ``ds_j = p_j ((1 + s_j) dP_j - Delta)``
* normalized:  ``ds_j = p_j (c (1 + s_j - a) dP_j - Delta)``, plus, unless ``detach_range``,
  ``c (Delta - Delta0)`` at the arg-min key (if ``min s < 0``) and ``-c Delta`` at the arg-max key (if ``max s > 0``),
  with ``Delta0 = sum_j p_j dP_j``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dropout import draw_seed, keep_mask
from .inputs import AttentionInputs

# Scores held per block (elements). Small enough for the block's element-wise passes to stay in cache on a CPU,
# large enough that the matrix products are efficient.
DEFAULT_BLOCK_ELEMENTS = 1 << 19
MIN_BLOCK_ROWS = 16


def block_rows(inp: AttentionInputs, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    per_row = max(1, inp.batch * inp.heads * inp.nk)
    rows = max(MIN_BLOCK_ROWS, block_elements // per_row)
    return max(1, min(inp.nq, rows))


def _grouped(t: Tensor, kv_heads: int) -> Tensor:
    """``(B, Hq, n, X) -> (B, Hkv, G * n, X)`` so that one matrix product per key/value head serves its G groups."""
    b, hq, n, x = t.shape
    return t.reshape(b, kv_heads, (hq // kv_heads) * n, x)


def _ungrouped(t: Tensor, heads: int) -> Tensor:
    b, hkv, gn, x = t.shape
    return t.view(b, heads, gn * hkv // heads, x)


class _Block:
    """Scores of query rows ``[i0, i1)`` and the masks that go with them."""

    def __init__(self, inp: AttentionInputs, qs: Tensor, bias: Tensor | None, i0: int, i1: int):
        cdt = inp.compute_dtype
        self.qg = _grouped(qs[:, :, i0:i1], inp.kv_heads)  # (B, Hkv, G*bq, D), pre-scaled for float32/64
        s = _ungrouped(torch.matmul(self.qg, inp.k.transpose(-1, -2)), inp.heads)
        if s.dtype != cdt:  # half inputs: product in the input dtype, row math in float32
            s = s.to(cdt).mul_(inp.scale)
        add = inp.additive(i0, i1, cdt)
        if add is not None:
            s.add_(add)
        if bias is not None:
            s.add_(bias if bias.shape[2] == 1 else bias[:, :, i0:i1])
        self.vis = inp.visible(i0, i1)
        if self.vis is not None:
            s.masked_fill_(~self.vis, float("-inf"))
        self.s = s  # masked entries are -inf

    def zero_masked(self) -> Tensor:
        """Turn masked scores into 0 (in place) so that they can be multiplied safely."""
        if self.vis is not None:
            self.s.masked_fill_(~self.vis, 0.0)
        return self.s


def _scaled_q(inp: AttentionInputs) -> Tensor:
    # float32/64: fold the scale into q once (O(N*D)); half: scale the float32 scores instead, like the reference.
    return inp.q * inp.scale if inp.q.dtype in (torch.float32, torch.float64) else inp.q


class _ChunkedSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, inp: AttentionInputs, rows: int):
        B, Hq, Nq, _ = q.shape
        Dv = v.shape[-1]
        cdt = inp.compute_dtype
        norm, want_idx = inp.normalize, inp.normalize and not inp.detach_range
        qs = _scaled_q(inp)
        out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hq, Nq, dtype=cdt, device=q.device)
        a_all = torch.empty_like(lse) if norm else None
        b_all = torch.empty_like(lse) if norm else None
        idx_min = torch.empty(B, Hq, Nq, dtype=torch.long, device=q.device) if want_idx else None
        idx_max = torch.empty_like(idx_min) if want_idx else None
        seed = draw_seed(inp.generator) if inp.dropout_p > 0 else None
        for i0 in range(0, Nq, rows):
            i1 = min(Nq, i0 + rows)
            blk = _Block(inp, qs, bias, i0, i1)
            s = blk.s
            if want_idx:
                mx, imax = s.max(dim=-1)
            else:
                mx = s.amax(dim=-1)
            m = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            e = torch.sub(s, m[..., None]).exp_()  # masked -> 0
            l = e.sum(dim=-1)
            empty = l == 0  # rows with no visible key
            lse[:, :, i0:i1] = torch.where(empty, torch.full_like(m, float("inf")), m + torch.log(l))
            s = blk.zero_masked()
            r = torch.where(empty, torch.zeros_like(l), 1.0 / torch.where(empty, torch.ones_like(l), l))
            if norm:
                if want_idx:
                    mn, imin = s.min(dim=-1)
                    idx_min[:, :, i0:i1] = imin
                    idx_max[:, :, i0:i1] = imax
                else:
                    mn = s.amin(dim=-1)
                a = mn.clamp(max=0.0)
                b = mx.clamp(min=0.0)
                c = 1.0 / (b - a + inp.eps)
                a_all[:, :, i0:i1] = a
                b_all[:, :, i0:i1] = b
                w = s.sub_(a[..., None]).mul_(e)  # (s - a) * e
                r = r * c
            else:
                w = s.mul_(e)  # s * e
            if seed is not None:
                keep = keep_mask(seed, inp.dropout_p, B, Hq, Nq, inp.nk, i0, i1, q.device)
                w.mul_(keep)
                r = r / (1.0 - inp.dropout_p)
            if v.dtype == cdt:
                o = torch.matmul(_grouped(w, inp.kv_heads), v)
                o = _ungrouped(o, Hq).mul_(r[..., None])
            else:  # half: normalize in float32, then one product in the input dtype (as the reference)
                w.mul_(r[..., None])
                o = _ungrouped(torch.matmul(_grouped(w.to(v.dtype), inp.kv_heads), v), Hq)
            out[:, :, i0:i1] = o
        ctx.save_for_backward(q, k, v, bias, out, lse, a_all, b_all, idx_min, idx_max)
        ctx.inp, ctx.rows, ctx.seed = inp, rows, seed
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, out, lse, a_all, b_all, idx_min, idx_max = ctx.saved_tensors
        inp: AttentionInputs = ctx.inp
        B, Hq, Nq, _ = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        cdt = inp.compute_dtype
        norm, range_grad = inp.normalize, inp.normalize and not inp.detach_range
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        # Scores are recomputed exactly as in the forward; everything after runs in the compute dtype
        # (float32 for half inputs).
        qs = _scaled_q(inp)
        qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
        qs_c = qs if qs.dtype == cdt else qc * inp.scale
        g_all = grad_out.to(cdt)
        delta_all = (g_all * out.to(cdt)).sum(dim=-1)  # Delta = g . o per row
        dq = torch.empty_like(qc) if need_q else None
        dk = torch.zeros_like(kc) if need_k else None
        dv = torch.zeros_like(vc) if need_v else None
        dbias = torch.zeros(ctx.bias_shape, dtype=cdt, device=q.device) if need_bias else None
        for i0 in range(0, Nq, ctx.rows):
            i1 = min(Nq, i0 + ctx.rows)
            blk = _Block(inp, qs, bias, i0, i1)
            p = torch.sub(blk.s, lse[:, :, i0:i1, None]).exp_()  # softmax probabilities, masked -> 0
            s = blk.zero_masked()
            g = g_all[:, :, i0:i1]
            delta = delta_all[:, :, i0:i1, None]
            dP = _ungrouped(torch.matmul(_grouped(g, Hkv), vc.transpose(-1, -2)), Hq)
            keep = None
            if ctx.seed is not None:
                keep = keep_mask(ctx.seed, inp.dropout_p, B, Hq, Nq, Nk, i0, i1, q.device).to(cdt)
                keep.mul_(1.0 / (1.0 - inp.dropout_p))
                dP.mul_(keep)
            if norm:
                a = a_all[:, :, i0:i1, None]
                b = b_all[:, :, i0:i1, None]
                c = 1.0 / (b - a + inp.eps)
                if range_grad:
                    delta0 = (p * dP).sum(dim=-1, keepdim=True)
                w = torch.addcmul(-a * c, s, c).mul_(p) if need_v else None  # (s - a) c p
                ds = torch.addcmul((1.0 - a) * c, s, c)  # c (1 + s - a)
            else:
                w = s * p if need_v else None
                ds = s + 1.0
            ds.mul_(dP).sub_(delta).mul_(p)
            if range_grad:
                mn_neg = (a < 0).to(cdt)
                mx_pos = (b > 0).to(cdt)
                da = c * (delta - delta0) * mn_neg
                db = -c * delta * mx_pos
                ds.scatter_add_(-1, idx_min[:, :, i0:i1, None], da)
                ds.scatter_add_(-1, idx_max[:, :, i0:i1, None], db)
            if need_v:
                if keep is not None:
                    w.mul_(keep)
                dv += torch.matmul(_grouped(w, Hkv).transpose(-1, -2), _grouped(g, Hkv))
            dsg = _grouped(ds, Hkv)
            if need_q:
                dq[:, :, i0:i1] = _ungrouped(torch.matmul(dsg, kc), Hq).mul_(inp.scale)
            if need_k:
                qg = blk.qg if blk.qg.dtype == cdt else _grouped(qs_c[:, :, i0:i1], Hkv)
                dk += torch.matmul(dsg.transpose(-1, -2), qg)
            if need_bias:
                _accumulate_bias_grad(dbias, ds, i0, i1)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if dv is None else dv.to(v.dtype),
            None if dbias is None else dbias.to(bias.dtype),
            None,
            None,
        )


def _accumulate_bias_grad(dbias: Tensor, ds: Tensor, i0: int, i1: int) -> None:
    dims = [d for d in range(4) if dbias.shape[d] == 1 and ds.shape[d] != 1]
    red = ds.sum(dim=dims, keepdim=True) if dims else ds
    if dbias.shape[2] == 1:
        dbias += red
    else:
        dbias[:, :, i0:i1] += red


def chunked_attention(inp: AttentionInputs, block_size: int | None = None) -> Tensor:
    """Memory-efficient SA attention; ``block_size`` fixes the number of query rows per block (default: automatic)."""
    rows = block_rows(inp) if block_size is None else max(1, min(int(block_size), inp.nq))
    if inp.nq == 0 or inp.nk == 0 or inp.batch == 0 or inp.heads == 0:
        shape = (inp.batch, inp.heads, inp.nq, inp.v.shape[-1])
        zeros = inp.q.new_zeros(shape)
        # keep the graph connected so that .backward() works and yields zero gradients
        return zeros + 0.0 * (inp.q.sum() + inp.k.sum() + inp.v.sum())
    return _ChunkedSA.apply(inp.q, inp.k, inp.v, inp.bias, inp, rows)
