"""Traces a training step of the triton backend as torch.compile's AOTAutograd
does, on a machine without a GPU, and prints what the graphs hold (JSON).

Run without TRITON_INTERPRET (the kernels must be real ``triton.jit``
functions, as on a GPU), so that the launchers are ``torch.library.triton_op`` ops.
The tensors are fake CUDA tensors (no kernel runs), and Triton's active
driver is a stand-in that reports an sm_90 target: torch lowers each kernel
to TTIR with it to find which of its arguments the kernel writes.
``tests/test_compile.py`` runs this and checks the report.
"""
import json
import sys
from types import SimpleNamespace

import torch
import triton
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget

from mammoth_fast import Mammoth, reference
from mammoth_fast.kernels import _launch, _ops


class Sm90Driver:
    """What torch asks of Triton's driver when it lowers a kernel to TTIR."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def describe(gm) -> dict:
    """Kernels launched by the graph, the operators left opaque, and each buffer
    a kernel writes, named by the node that made it."""
    producers = {n.name: n for n in gm.graph.nodes}
    kernels, opaque, written = [], [], []
    for node in gm.graph.nodes:
        target = str(node.target)
        if "triton_kernel_wrapper" in target:
            name = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            kernels.append(name)
            for arg in node.kwargs["tensors_to_clone"]:
                src = node.kwargs["kwargs"][arg]
                made_by = producers[src.name]
                written.append([name, arg, str(made_by.target) if made_by.op == "call_function" else made_by.op])
        elif "mammoth_fast" in target:
            opaque.append(target)
    return dict(kernels=kernels, opaque=opaque, written=written)


def chain(layer, x):
    """The triton backend's forward in training (slot dropout on), then every
    backward op on the forward's tensors, as the autograd Functions call them
    (autograd itself cannot run on fake CUDA tensors in a CPU-only torch)."""
    out = layer(x)  # no tensor requires grad: the forward launchers
    p = layer.params()
    bsz, n, din = x.shape
    drop = (torch.full((1,), 7, dtype=torch.int64, device=x.device), layer.slot_dropout)
    q, mean, rstd, y_pre = _ops.query_forward(x.reshape(bsz * n, din), p.wq_weight, p.wq_bias, p.norm_gamma,
                                               p.norm_beta, p.use_layernorm, store_y=True)
    q = q.view(bsz, n, -1)
    k = reference.slot_keys(p, torch.float32).contiguous()
    lora = (p.shared_weight, p.shared_bias, p.expert_weights, p.expert_bias, p.expert_gamma)
    z, lse_d = _ops.dispatch_forward(q, k, None, drop)
    y, inv_norm, v = _ops.experts_forward(z, *lora)
    o, lse_c = _ops.combine_forward(q, k, y, None, x.dtype, drop)
    dq_c, dk_c, dy = _ops.combine_backward(out, q, k, y, o, lse_c, None, drop, True, True, True)
    dz, *dlora = _ops.experts_backward(dy, z, *lora, v, inv_norm, True, True)
    dq_d, dk_d = _ops.dispatch_backward(dz, q, k, z, lse_d, None, drop, True, True)
    dy_pre, dgamma, db = _ops.query_norm_backward((dq_c + dq_d).reshape(bsz * n, -1), y_pre, mean, rstd,
                                                  p.norm_gamma, p.use_layernorm, True, True, True)
    return out, dk_c + dk_d, dy_pre, dgamma, db, *dlora


class Chain(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return chain(self.layer, x)


def main() -> None:
    if not torch.cuda.is_available():  # no GPU: fake what torch asks of one (on a GPU, the real ones answer)
        triton.runtime.driver.set_active(Sm90Driver())
        torch.cuda.get_device_properties = lambda device: SimpleNamespace(multi_processor_count=132)  # an H100's
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    layer = Mammoth(input_dim=24, dim=16, num_experts=3, num_slots=2, num_heads=2, slot_dim=8, lora_rank=3,
                    keep_slots=False, slot_dropout=0.2, backend="triton").train().requires_grad_(False)
    model = Chain(layer)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    names = list(shapes)
    with FakeTensorMode():  # parameters, buffers and input as fake CUDA tensors, swapped in by functional_call
        tensors = [torch.randn(shape, device="cuda") for shape in shapes.values()]
        x = torch.randn(2, 40, 24, device="cuda")
        traced = aot_function(lambda x, *ts: torch.func.functional_call(model, dict(zip(names, ts)), (x,)),
                              fw_compiler=capture)
        outs = traced(x, *tensors)
        report = dict(triton_op=_launch.TRITON_OP, shapes=[list(t.shape) for t in outs],
                      devices=sorted({str(t.device) for t in outs}))
    # the kernels torch knows each op to launch: they key torch.compile's AOTAutograd cache
    report["declared"] = {name: sorted(k.fn.__name__ for k in get_triton_kernels_for_op(f"{_ops.NS}::{name}"))
                          for name in _ops.OPS}
    report.update(describe(graphs[0]))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
