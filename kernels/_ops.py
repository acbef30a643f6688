"""The kernel launchers as PyTorch operators (namespace ``mammoth_fast``), for torch.compile.

Each launcher (forward and backward of query, dispatch, experts, combine) is
registered with ``torch.library.triton_op`` where torch offers it (>= 2.6) and
the kernels are compiled: the launchers issue their kernels through
``wrap_triton`` while torch traces (``_launch.launch``), so torch.compile
traces into them and Inductor sees every kernel launch as a node of its graph
(and ``torch.export`` + AOTInductor can package them). Under Triton's CPU
interpreter the kernels are plain Python that cannot be traced, and the same
launchers are registered as opaque ``torch.library.custom_op`` ops
(``_launch.TRITON_OP`` says which). Either way each op has a fake (meta)
implementation giving its outputs' shapes and dtypes; autograd is in
``kernels/autograd.py``, whose Functions call the wrappers below.

The wrappers go through the operator only while torch traces: in eager mode
they call the launcher directly, since an operator's dispatch costs about
50 us a call on the CPU, as much as a kernel of a small bag. They keep the
launchers' signatures (``None`` for an absent tensor, ``drop`` as (seed, p)
or None); an operator cannot return None, so an absent output travels as an
empty tensor and is turned back into None here.

Imports run one way: autograd -> _ops -> the launcher modules -> _launch.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import combine as _c
from . import dispatch as _d
from . import experts as _e
from . import query as _q
from ._launch import TRITON_OP, acc_dtype, tracing
from ._slot_dropout import seed_tensor

NS = "mammoth_fast"


def _op(name: str, *kernels):
    """Registers a launcher as the operator ``mammoth_fast::<name>``; ``kernels``
    are the @triton.jit kernels it launches. Returns (operator, launcher).

    A triton_op's kernels key torch.compile's AOTAutograd cache (their sources,
    called jit functions included): torch finds them by scanning the op's source
    for literal ``wrap_triton(kernel)`` calls, which misses launches through
    ``_launch.launch`` in the launcher modules, so they are declared here.
    Without them an edited or upgraded kernel could reuse a stale compiled graph.
    """
    qualname = f"{NS}::{name}"

    def register(fn):
        if not TRITON_OP:
            return torch.library.custom_op(qualname, mutates_args=())(fn)
        op = torch.library.triton_op(qualname, mutates_args=())(fn)
        declared = getattr(torch._library.triton, "triton_ops_to_kernels", None)  # torch's op -> kernels table
        if isinstance(declared, dict):
            declared[qualname] = list(kernels)
        return op
    return register


def _empty(like: Tensor, dtype=None) -> Tensor:
    return torch.empty(0, device=like.device, dtype=dtype or like.dtype)


def _opt(t: Optional[Tensor], like: Tensor, dtype=None) -> Tensor:
    return _empty(like, dtype) if t is None else t


def _call(op, fn, *args):
    """``op(*args)`` while torch traces, else ``fn(*args)``, its implementation."""
    return op(*args) if tracing() else fn(*args)


def make_drop(seed: Optional[Tensor], p: float):
    return (seed, p) if seed is not None else None


def drop_args(drop, like: Tensor):
    """drop (seed, p) or None -> the ops' (seed, p_drop): the seed as a (1,) int64 tensor, or None."""
    return (seed_tensor(drop[0], like.device), float(drop[1])) if drop is not None else (None, 0.0)


# ------------------------------------------------------------------- query
def _query_fwd(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Optional[Tensor],
               use_layernorm: bool, store_y: bool) -> List[Tensor]:
    m, c = x.shape[0], weight.shape[0]
    y = torch.empty(m, c, device=x.device, dtype=x.dtype) if store_y else None
    q, mean, rstd = _q.query_forward(x, weight, bias, gamma, beta, use_layernorm, y_out=y)
    return [q, _opt(mean, rstd), rstd, _opt(y, q)]


query_fwd = _op("query_fwd", _q._query_fwd_kernel, _q._query_norm_fwd_kernel)(_query_fwd)


@query_fwd.register_fake
def _(x, weight, bias, gamma, beta, use_layernorm, store_y):
    m, c = x.shape[0], weight.shape[0]
    stat = dict(device=x.device, dtype=acc_dtype(x.dtype))
    q = x.new_empty(m, c)
    return [q, x.new_empty(m if use_layernorm else 0, dtype=stat["dtype"]), x.new_empty(m, dtype=stat["dtype"]),
            x.new_empty(m, c) if store_y else x.new_empty(0)]


def query_forward(x, weight, bias, gamma, beta, use_layernorm, store_y=False):
    """-> q, mean (None for RMS norm), rstd, y (None unless store_y)."""
    q, mean, rstd, y = _call(query_fwd, _query_fwd, x, weight, bias, gamma, beta, use_layernorm, store_y)
    return q, (mean if use_layernorm else None), rstd, (y if store_y else None)


def _query_norm_bwd(dq: Tensor, y: Tensor, mean: Optional[Tensor], rstd: Tensor, gamma: Tensor, use_layernorm: bool,
                    need_dy: bool, need_dgamma: bool, need_db: bool) -> List[Tensor]:
    dy, dgamma, db = _q.query_norm_backward(dq, y, mean, rstd, gamma, use_layernorm, need_dy, need_dgamma, need_db)
    return [_opt(dy, y), _opt(dgamma, rstd), _opt(db, rstd)]


query_norm_bwd = _op("query_norm_bwd", _q._query_norm_bwd_kernel)(_query_norm_bwd)


@query_norm_bwd.register_fake
def _(dq, y, mean, rstd, gamma, use_layernorm, need_dy, need_dgamma, need_db):
    c = y.shape[1]
    return [y.new_empty(y.shape if need_dy else (0,)), rstd.new_empty(c if need_dgamma else 0),
            rstd.new_empty(c if need_db and need_dy else 0)]


def query_norm_backward(dq, y, mean, rstd, gamma, use_layernorm, need_dy, need_dgamma, need_db=False):
    """-> dy, dgamma, db (None where not needed; db needs dy)."""
    dy, dgamma, db = _call(query_norm_bwd, _query_norm_bwd, dq, y, mean, rstd, gamma, use_layernorm, need_dy,
                           need_dgamma, need_db)
    return (dy if need_dy else None), (dgamma if need_dgamma else None), (db if need_db and need_dy else None)


# ---------------------------------------------------------------- dispatch
def _dispatch_fwd(q: Tensor, k: Tensor, mask: Optional[Tensor], seed: Optional[Tensor],
                  p_drop: float, legacy: bool) -> List[Tensor]:
    z, lse = _d.dispatch_forward(q, k, mask, make_drop(seed, p_drop), legacy)
    return [z, lse]


dispatch_fwd = _op("dispatch_fwd", _d._dispatch_partial_kernel, _d._dispatch_merge_kernel)(_dispatch_fwd)


@dispatch_fwd.register_fake
def _(q, k, mask, seed, p_drop, legacy):
    bsz = q.shape[0]
    h, p, dh = k.shape
    acc = acc_dtype(q.dtype)
    return [q.new_empty(bsz, h, p, dh, dtype=acc), q.new_empty(bsz, h, p, dtype=acc)]


def dispatch_forward(q, k, mask, drop=None, legacy=False):
    z, lse = _call(dispatch_fwd, _dispatch_fwd, q, k, mask, *drop_args(drop, q), legacy)
    return z, lse


def _dispatch_bwd(dz: Tensor, q: Tensor, k: Tensor, z: Tensor, lse: Tensor, mask: Optional[Tensor],
                  seed: Optional[Tensor], p_drop: float, need_dq: bool, need_dk: bool, legacy: bool,
                  dout: Optional[Tensor], out: Optional[Tensor], y: Optional[Tensor],
                  lse_c: Optional[Tensor]) -> List[Tensor]:
    combine = (dout, out, y, lse_c) if dout is not None else None
    dq, dk = _d.dispatch_backward(dz, q, k, z, lse, mask, make_drop(seed, p_drop), need_dq, need_dk, legacy, combine)
    return [_opt(dq, q), _opt(dk, z)]


dispatch_bwd = _op("dispatch_bwd", _d._dispatch_bwd_kernel, _d._dispatch_bwd_dq_kernel,
                   _d._dispatch_bwd_dk_kernel, _c._combine_bwd_dq_kernel, _c._combine_bwd_dkdy_kernel)(_dispatch_bwd)


@dispatch_bwd.register_fake
def _(dz, q, k, z, lse, mask, seed, p_drop, need_dq, need_dk, legacy, dout, out, y, lse_c):
    return [q.new_empty(q.shape if need_dq else (0,)), z.new_empty(k.shape if need_dk else (0,))]


def dispatch_backward(dz, q, k, z, lse, mask, drop, need_dq, need_dk, legacy=False, combine=None):
    """``combine``: (dO, out, Y, LSE_c) of the combine forward, whose dq and dK
    are then added (``dispatch.routing_bwd_fused_ok``)."""
    dq, dk = _call(dispatch_bwd, _dispatch_bwd, dz, q, k, z, lse, mask, *drop_args(drop, q), need_dq, need_dk,
                   legacy, *(combine if combine is not None else (None,) * 4))
    return (dq if need_dq else None), (dk if need_dk else None)


# ----------------------------------------------------------------- experts
def _experts_fwd(z: Tensor, shared_weight: Tensor, shared_bias: Tensor, expert_weights: Tensor,
                 expert_bias: Tensor, expert_gamma: Tensor) -> List[Tensor]:
    return list(_e.experts_forward(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma))


experts_fwd = _op("experts_fwd", _e._experts_proj_kernel, _e._experts_norm_kernel)(_experts_fwd)


@experts_fwd.register_fake
def _(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
    bsz, h, p, _ = z.shape
    d = h * expert_weights.shape[-1]
    return [z.new_empty(bsz, p, d), z.new_empty(bsz, p), z.new_empty(bsz, p, d)]


def experts_forward(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
    """-> Y (B, P, D), the inverse norms (B, P) and v (B, P, D), for the backward."""
    y, inv_norm, v = _call(experts_fwd, _experts_fwd, z, shared_weight, shared_bias, expert_weights, expert_bias,
                           expert_gamma)
    return y, inv_norm, v


def _experts_bwd(dy: Tensor, z: Tensor, shared_weight: Tensor, shared_bias: Tensor, expert_weights: Tensor,
                 expert_bias: Tensor, expert_gamma: Tensor, v: Tensor, inv_norm: Tensor, need_param_grads: bool,
                 need_dz: bool) -> List[Tensor]:
    params = (shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma)
    grads = _e.experts_backward(dy, z, *params, v, inv_norm, need_param_grads, need_dz)
    return [_opt(g, like) for g, like in zip(grads, (z, *params))]


experts_bwd = _op("experts_bwd", _e._experts_norm_bwd_kernel, _e._experts_proj_bwd_kernel)(_experts_bwd)


@experts_bwd.register_fake
def _(dy, z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma, v, inv_norm, need_param_grads,
      need_dz):
    params = (shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma)
    return [z.new_empty(z.shape if need_dz else (0,))] + [
        prm.new_empty(prm.shape if need_param_grads else (0,)) for prm in params]


def experts_backward(dy, z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma, v, inv_norm,
                     need_param_grads=True, need_dz=True):
    grads = _call(experts_bwd, _experts_bwd, dy, z, shared_weight, shared_bias, expert_weights, expert_bias,
                  expert_gamma, v, inv_norm, need_param_grads, need_dz)
    return (grads[0] if need_dz else None, *(g if need_param_grads else None for g in grads[1:]))


# ----------------------------------------------------------------- combine
def _combine_fwd(q: Tensor, k: Tensor, y: Tensor, mask: Optional[Tensor], out_dtype: torch.dtype,
                 seed: Optional[Tensor], p_drop: float, legacy: bool) -> List[Tensor]:
    out, lse = _c.combine_forward(q, k, y, mask, out_dtype, make_drop(seed, p_drop), legacy)
    return [out, lse]


combine_fwd = _op("combine_fwd", _c._combine_fwd_kernel)(_combine_fwd)


@combine_fwd.register_fake
def _(q, k, y, mask, out_dtype, seed, p_drop, legacy):
    bsz, n, _ = q.shape
    return [q.new_empty(bsz, n, y.shape[2], dtype=out_dtype), q.new_empty(bsz, n, k.shape[0], dtype=acc_dtype(q.dtype))]


def combine_forward(q, k, y, mask, out_dtype, drop=None, legacy=False):
    out, lse = _call(combine_fwd, _combine_fwd, q, k, y, mask, out_dtype, *drop_args(drop, q), legacy)
    return out, lse


def _combine_bwd(dout: Tensor, q: Tensor, k: Tensor, y: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                 seed: Optional[Tensor], p_drop: float, need_dq: bool, need_dk: bool,
                 need_dy: bool, legacy: bool) -> List[Tensor]:
    dq, dk, dy = _c.combine_backward(dout, q, k, y, out, lse, mask, make_drop(seed, p_drop),
                                     need_dq, need_dk, need_dy, legacy)
    acc = acc_dtype(q.dtype)
    return [_opt(dq, q), _opt(dk, q, acc), _opt(dy, q, acc)]


combine_bwd = _op("combine_bwd", _c._combine_bwd_dq_kernel, _c._combine_bwd_dkdy_kernel)(_combine_bwd)


@combine_bwd.register_fake
def _(dout, q, k, y, out, lse, mask, seed, p_drop, need_dq, need_dk, need_dy, legacy):
    acc = acc_dtype(q.dtype)
    return [q.new_empty(q.shape if need_dq else (0,)), q.new_empty(k.shape if need_dk else (0,), dtype=acc),
            q.new_empty(y.shape if need_dy else (0,), dtype=acc)]


def combine_backward(dout, q, k, y, out, lse, mask, drop, need_dq, need_dk, need_dy, legacy=False):
    dq, dk, dy = _call(combine_bwd, _combine_bwd, dout, q, k, y, out, lse, mask, *drop_args(drop, q),
                       need_dq, need_dk, need_dy, legacy)
    return (dq if need_dq else None), (dk if need_dk else None), (dy if need_dy else None)


OPS = {"query_fwd": query_fwd, "query_norm_bwd": query_norm_bwd, "dispatch_fwd": dispatch_fwd,
       "dispatch_bwd": dispatch_bwd, "experts_fwd": experts_fwd, "experts_bwd": experts_bwd,
       "combine_fwd": combine_fwd, "combine_bwd": combine_bwd}
