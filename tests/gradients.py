"""Shared by the backends' gradient tests: random batches, gradients of a layer
and of the float64 reference, and the SPEC section 10 comparison."""
import torch

from conftest import rel_err
from mammoth_fast import reference

FP32_OUT_TOL = 1e-5
FP32_GRAD_TOL = 1e-4


def random_mask(b, n, seed):
    """(B, N) bool, about 70 % True, patch 0 always kept (no empty bag)."""
    mask = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, 0] = True
    return mask


def random_batch(ref, b, n, seed):
    """float64 feats (B, N, Din) and an output gradient shaped as ``ref``'s output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, ref.input_dim, generator=g, dtype=torch.float64)
    out_n = ref.num_experts * ref.num_slots if ref.keep_slots else n
    dout = torch.randn(b, out_n, ref.dim, generator=g, dtype=torch.float64)
    return x, dout


def layer_grads(layer, x, dout, mask=None):
    """out and the gradients of (x, every parameter), by name; x, dout and mask
    are moved to the layer's device and dtype."""
    weight = layer.wq.weight
    x = x.to(weight.device, weight.dtype).requires_grad_()
    out = layer(x, mask=None if mask is None else mask.to(weight.device))
    names, prms = zip(*layer.named_parameters())
    grads = torch.autograd.grad(out, (x, *prms), dout.to(out.device, out.dtype))
    return out.detach(), dict(zip(("x", *names), grads))


def reference_grads(ref, x, dout, mask=None, slot_keep=None, y_keep=None):
    """float64 autograd of reference.forward with explicit masks."""
    x = x.detach().requires_grad_()
    out = reference.forward(x, ref.params(), keep_slots=ref.keep_slots, mask=mask, slot_keep=slot_keep,
                            y_keep=y_keep, dropout_p=ref.expert_heads.dropout.p)
    names, prms = zip(*ref.named_parameters())
    grads = torch.autograd.grad(out, (x, *prms), dout)
    return out.detach(), dict(zip(("x", *names), grads))


def grad_err(got, want) -> float:
    """rel_err, or the plain norm where the reference gradient is exactly zero
    (one patch: the dispatch weights are all 1 whatever the keys)."""
    got = got.detach().cpu()
    return rel_err(got, want) if want.norm() > 0 else got.double().norm().item()


def assert_close(got, want, out_tol=FP32_OUT_TOL, grad_tol=FP32_GRAD_TOL):
    """(out, grads) against the reference's: finite output, and SPEC's relative errors."""
    (out, grads), (out_ref, grads_ref) = got, want
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), out_ref) <= out_tol
    assert grads.keys() == grads_ref.keys()
    errs = {name: grad_err(grads[name], grads_ref[name]) for name in grads_ref}
    bad = {name: err for name, err in errs.items() if not err <= grad_tol}
    assert not bad, bad
