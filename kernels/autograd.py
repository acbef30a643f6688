"""The autograd Functions of the four stages, each calling its forward and
backward operators (``kernels/_ops.py``). Each saves only what its backward
needs (no N x H x P tensor), so each stage can be gradchecked alone; the
triton backend (``mammoth_fast/triton_backend.py``) chains them. All are
once-differentiable: double backward raises.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _ops
from ._launch import acc_dtype, legacy_plan


class QueryFunction(torch.autograd.Function):
    """q = norm(x @ W^T + b) (M, C) in x's dtype. Saves x (only if W needs a
    gradient), W, gamma and, for the backward, y (M, C), mean and rstd (M,):
    O(M * C) beyond the inputs. beta is a buffer: it gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, use_layernorm: bool):
        q, mean, rstd, y = _ops.query_forward(x, weight, bias, gamma, beta, use_layernorm,
                                              store_y=any(ctx.needs_input_grad[:4]))
        # x (M, Din), under autocast a half copy of the features, is kept only for dWq
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, gamma, y, mean, rstd)
        ctx.use_layernorm = use_layernorm
        ctx.bias_dtype = bias.dtype
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, dq):
        x, weight, gamma, y, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dgamma = ctx.needs_input_grad[:4]
        need_dy = need_dx or need_dw or need_db
        if not (need_dy or need_dgamma):
            return None, None, None, None, None, None
        # db = dy.sum(0) comes from the norm kernel (its rows' partials), not from a second pass over dy
        dy, dgamma, db = _ops.query_norm_backward(dq, y, mean, rstd, gamma, ctx.use_layernorm, need_dy, need_dgamma,
                                                  need_db)
        # dy is in x's dtype, so with bf16/fp16 inputs the GEMMs run on tensor
        # cores with fp32 accumulation, as the eager layer's backward under
        # autocast does; fp32 GEMMs would first copy x, the largest tensor, to
        # fp32, for accuracy beyond what SPEC section 10 asks.
        dx = dy @ weight.to(dy.dtype) if need_dx else None  # (M, Din)
        dw = (dy.t() @ x).to(weight.dtype) if need_dw else None  # (C, Din)
        db = db.to(ctx.bias_dtype) if need_db else None  # (C,)
        dgamma = dgamma.to(gamma.dtype) if need_dgamma else None
        return dx, dw, db, dgamma, None, None


class DispatchFunction(torch.autograd.Function):
    """(Z, LSE) = dispatch(q, K) per (bag, head); saves q, K, Z and LSE (no N*H*P
    tensor). LSE (B, H, P) is returned for ``return_weights`` and carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, mask, drop, legacy=False):
        seed, ctx.p_drop = _ops.drop_args(drop, q)
        ctx.legacy = legacy  # the backward follows the forward's kernel plan (its slot-dropout generator)
        z, lse = _ops.dispatch_forward(q, k, mask, _ops.make_drop(seed, ctx.p_drop), legacy)
        ctx.save_for_backward(q, k, z, lse, mask, seed)
        ctx.mark_non_differentiable(lse)
        return z, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, _dlse):
        q, k, z, lse, mask, seed = ctx.saved_tensors
        drop = _ops.make_drop(seed, ctx.p_drop)
        dq, dk = _ops.dispatch_backward(dz, q, k, z, lse, mask, drop, *ctx.needs_input_grad[:2], ctx.legacy)
        return dq, dk, None, None, None


class ExpertsFunction(torch.autograd.Function):
    """Y = experts(Z) with the kernels; saves Z, the parameters, v (B, P, D) and
    the inverse norms (B, P): B * P * D values, independent of N."""

    @staticmethod
    def forward(ctx, z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
        y, inv_norm, v = _ops.experts_forward(z.to(acc_dtype(z.dtype)), shared_weight, shared_bias, expert_weights,
                                              expert_bias, expert_gamma)
        ctx.save_for_backward(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma, v, inv_norm)
        # no no-op .to(): under torch.compile, torch 2.11 drops the gradient of a
        # Function output that is a no-op .to() of a custom op's output (zeros in backward)
        return y if y.dtype == z.dtype else y.to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_dz, *need_params = ctx.needs_input_grad
        grads = _ops.experts_backward(dy, *ctx.saved_tensors, need_param_grads=any(need_params), need_dz=need_dz)
        return grads[0], *(g if need else None for g, need in zip(grads[1:], need_params))


class CombineFunction(torch.autograd.Function):
    """out = combine(q, K, Y) (B, N, D); saves q, K, Y, out and LSE (B, N, H):
    no N*H*P tensor."""

    @staticmethod
    def forward(ctx, q, k, y, mask, drop, out_dtype, legacy=False):
        seed, ctx.p_drop = _ops.drop_args(drop, q)
        ctx.legacy = legacy
        out, lse = _ops.combine_forward(q, k, y, mask, out_dtype, _ops.make_drop(seed, ctx.p_drop), legacy)
        ctx.save_for_backward(q, k, y, out, lse, mask, seed)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, y, out, lse, mask, seed = ctx.saved_tensors
        drop = _ops.make_drop(seed, ctx.p_drop)
        dq, dk, dy = _ops.combine_backward(dout, q, k, y, out, lse, mask, drop, *ctx.needs_input_grad[:3],
                                           ctx.legacy)
        return dq, dk, dy, None, None, None, None


class RoutingFunction(torch.autograd.Function):
    """keep_slots=False in the default kernel plan where the fused backward takes
    combine's part (``dispatch.routing_bwd_fused_ok``): dispatch, experts, the
    dropout on Y and combine as one Function, out (B, N, D) and LSE_d (B, H,
    P; no gradient) from q, K and the experts' parameters. Its backward runs
    combine's dY kernel, the experts backward, then one kernel for the dq and
    dK of dispatch and combine together: two exponential passes over the
    logits instead of three, and no sum of two dq (``dispatch.dispatch_backward``
    with ``combine``, which also runs combine's kernels for the far patches,
    none in all but extreme logits: ``_launch.RESCALE_MAX_LOG2``). Saves what the four
    Functions of the chain would (no N*H*P tensor), plus Y's dropout mask (B, P, D)."""

    @staticmethod
    def forward(ctx, q, k, mask, drop, out_dtype, y_dropout: float, *lora):
        seed, ctx.p_drop = _ops.drop_args(drop, q)
        drop = _ops.make_drop(seed, ctx.p_drop)
        z, lse_d = _ops.dispatch_forward(q, k, mask, drop, False)  # (B, H, P, dh), (B, H, P)
        y, inv_norm, v = _ops.experts_forward(z, *lora)  # (B, P, D) in the accumulator dtype
        keep = None
        if y_dropout > 0:  # as the chain's plain-PyTorch dropout, drawn from the same generator
            keep = torch.rand_like(y) >= y_dropout
            y = y * keep / (1.0 - y_dropout)
        out, lse_c = _ops.combine_forward(q, k, y, mask, out_dtype, drop, False)  # (B, N, D), (B, N, H)
        ctx.save_for_backward(q, k, z, lse_d, y, out, lse_c, mask, seed, keep, v, inv_norm, *lora)
        ctx.y_dropout = y_dropout
        ctx.mark_non_differentiable(lse_d)
        return out, lse_d

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, z, lse_d, y, out, lse_c, mask, seed, keep, v, inv_norm, *lora = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[:2]
        need_lora = ctx.needs_input_grad[6:]
        drop = _ops.make_drop(seed, ctx.p_drop)
        dout = dout.contiguous()
        _, _, dy = _ops.combine_backward(dout, q, k, y, out, lse_c, mask, drop, False, False, True, False)
        if keep is not None:
            dy = dy * keep / (1.0 - ctx.y_dropout)
        dz, *dlora = _ops.experts_backward(dy, z, *lora, v, inv_norm, need_param_grads=any(need_lora),
                                           need_dz=need_dq or need_dk)
        dq = dk = None
        if need_dq or need_dk:
            dq, dk = _ops.dispatch_backward(dz, q, k, z, lse_d, mask, drop, need_dq, need_dk, False,
                                            (dout, out, y, lse_c))
        return dq, dk, None, None, None, None, *(g if need else None for g, need in zip(dlora, need_lora))


def dispatch(q, k, mask=None, drop=None, legacy=None):
    """Differentiable dispatch: q (B, N, C), k (H, P, dh) -> Z (B, H, P, dh);
    ``legacy`` None: the selected kernel plan (``_launch.legacy_kernels``)."""
    return DispatchFunction.apply(q, k, mask, drop, legacy_plan() if legacy is None else legacy)[0]


def experts(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
    """Differentiable experts: Z (B, H, P, dh) -> Y (B, P, D)."""
    return ExpertsFunction.apply(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma)


def combine(q, k, y, mask=None, drop=None, out_dtype=None, legacy=None):
    """Differentiable combine: q (B, N, C), K (H, P, dh), Y (B, P, D) -> out (B, N, D)."""
    return CombineFunction.apply(q, k, y, mask, drop, out_dtype or q.dtype,
                                 legacy_plan() if legacy is None else legacy)
