"""The triton backend's kernel launchers as zero-argument callables, for timing.

Each calls the launcher's operator (``mammoth_fast.kernels._ops``), as the
layer does: the time includes the op dispatch the layer pays.

``build_cases(n, dtype, device)`` runs the forward chain once to make
realistic inputs (q, K, Z, LSEs, Y, out) for one bag of ``n`` patches at the
recommended sizes, then returns one ``LauncherCase`` per launcher: the query,
dispatch, experts and combine forward and backward launchers. bf16 is set up
as under autocast: features, q and y in bf16, parameters in fp32. Each case
names the kernels of ``benchmarks.roofline`` it runs, so its time can be set
against their floor. Used by ``benchmarks/test_kernels_bench.py``
(pytest-benchmark) and ``python -m benchmarks.run`` on a CUDA GPU; on CPU the
launchers run only under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from .roofline import RECOMMENDED, Sizes


@dataclass(frozen=True)
class LauncherCase:
    name: str
    fn: Callable[[], object]
    kernels: Tuple[str, ...]  # names in benchmarks.roofline.mammoth_kernels(..., keep_slots=False, legacy=...)
    note: str = ""


CASE_NAMES = ("query_fwd", "query_fwd_train", "dispatch_fwd", "experts_fwd", "combine_fwd",
              "query_bwd", "dispatch_bwd", "experts_bwd", "combine_bwd")


def build_cases(n: int, dtype: torch.dtype, device, sz: Sizes = RECOMMENDED, seed: int = 0,
                legacy: bool = False) -> Dict[str, LauncherCase]:
    """The launchers of the kernel plan ``legacy`` or not (``_launch.legacy_kernels``)."""
    from mammoth_fast import Mammoth, reference
    from mammoth_fast.kernels._launch import acc_dtype
    from mammoth_fast.kernels.dispatch import dispatch_bwd_fused_ok, routing_bwd_fused_ok, routing_bwd_spill_free
    from mammoth_fast.kernels._ops import (combine_backward, combine_forward, dispatch_backward, dispatch_forward,
                                           experts_backward, experts_forward, query_forward, query_norm_backward)

    device = torch.device(device)
    torch.manual_seed(seed)
    layer = Mammoth(sz.din, sz.d, num_experts=sz.e, num_slots=sz.s, num_heads=sz.h, slot_dim=sz.c,
                    device=device).eval()
    with torch.no_grad():
        prm = layer.params()
        acc = acc_dtype(dtype)
        bn = sz.b * n
        x = torch.randn(bn, sz.din, device=device, dtype=dtype)
        w = prm.wq_weight.to(dtype)  # the backend casts Wq to the compute dtype
        qargs = (x, w, prm.wq_bias, prm.norm_gamma, prm.norm_beta, prm.use_layernorm)
        q, mean, rstd, y_pre = query_forward(*qargs, store_y=True)
        q3 = q.view(sz.b, n, sz.c)
        k = reference.slot_keys(prm, acc).contiguous()
        lora = (prm.shared_weight, prm.shared_bias, prm.expert_weights, prm.expert_bias, prm.expert_gamma)
        z, lse_d = dispatch_forward(q3, k, None, None, legacy)
        y, inv_norm, v = experts_forward(z, *lora)
        out, lse_c = combine_forward(q3, k, y, None, dtype, None, legacy)
        dq_in = torch.randn_like(q)  # gradient of q, as autograd hands it to the query backward
        dz = torch.randn_like(z)
        dy = torch.randn_like(y)
        dout = torch.randn_like(out)
        # keep_slots=False in the default plan (bf16): the fused routing backward takes combine's dq and dK
        routing = not legacy and routing_bwd_fused_ok(sz.p, sz.dh, sz.do, dtype)
        note = ""
        if routing and not routing_bwd_spill_free(q3, k, y, dtype):
            note = ("the fused routing backward spills on this triton: its launcher runs combine's dq and dK "
                    "kernels and the dispatch backward instead (timed here against the fused kernel's floor)")

    def query_bwd():  # QueryFunction.backward without dx: the features need no gradient in MIL training
        dy_pre, dgamma, db = query_norm_backward(dq_in, y_pre, mean, rstd, prm.norm_gamma, prm.use_layernorm, True,
                                                 True, True)
        dw = (dy_pre.t() @ x).to(prm.wq_weight.dtype)
        db = db.to(prm.wq_bias.dtype)
        return dw, db, dgamma

    def routing_bwd():  # keep_slots=False, default plan: dispatch's and combine's dq and dK in one kernel,
        # after combine's kernels for the far patches (none here: they only read LSE_c)
        return dispatch_backward(dz, q3, k, z, lse_d, None, None, True, True, False, (dout, out, y, lse_c))

    cases = [
        ("query_fwd", lambda: query_forward(*qargs), ("query fwd",)),
        ("query_fwd_train", lambda: query_forward(*qargs, store_y=True), ("query fwd (+y)",)),
        ("dispatch_fwd", lambda: dispatch_forward(q3, k, None, None, legacy),
         ("dispatch fwd partial", "dispatch fwd merge")),
        ("experts_fwd", lambda: experts_forward(z, *lora), ("experts fwd",)),
        ("combine_fwd", lambda: combine_forward(q3, k, y, None, dtype, None, legacy), ("combine fwd",)),
        ("query_bwd", query_bwd, ("query norm bwd", "query dW GEMM")),
        ("dispatch_bwd", routing_bwd if routing else
         lambda: dispatch_backward(dz, q3, k, z, lse_d, None, None, True, True, legacy),
         ("combine bwd far patches", "routing bwd (fused)") if routing else ("dispatch bwd (fused)",)
         if not legacy and dispatch_bwd_fused_ok(sz.p, sz.dh, dtype) else ("dispatch bwd dq", "dispatch bwd dK")),
        ("experts_bwd", lambda: experts_backward(dy, z, *lora, v, inv_norm, True, True), ("experts bwd",)),
        ("combine_bwd", lambda: combine_backward(dout, q3, k, y, out, lse_c, None, None, not routing, not routing,
                                                 True, legacy),
         ("combine bwd dY",) if routing else ("combine bwd dq (+delta_c)", "combine bwd dK/dY")),
    ]
    assert tuple(c[0] for c in cases) == CASE_NAMES

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    return {name: LauncherCase(name, no_grad(fn), kernels, note if name == "dispatch_bwd" else "")
            for name, fn, kernels in cases}
