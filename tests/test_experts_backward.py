"""Backward of the experts kernel (ExpertsFunction) against torch autograd of
the float64 reference (SPEC sections 2 step 6, 8 and 10). On CPU the kernels
run under TRITON_INTERPRET=1 (slow: the recommended sizes get one bag); with a
CUDA GPU the same tests run natively."""
import dataclasses

import pytest
import torch

from conftest import DEVICE, make_layer, rel_err
from mammoth_fast import reference
from mammoth_fast.kernels.autograd import ExpertsFunction, experts
from mammoth_fast.kernels.experts import experts_backward, experts_forward

FP32_GRAD_TOL = 1e-4
NAMES = ("z", "shared_weight", "shared_bias", "expert_weights", "expert_bias", "expert_gamma")
# awkward sizes (odd ranks 13 and 27, E = 1, S = 1, H = 1, dh and do not powers of two)
# and two slot blocks per expert (S = 20)
AWKWARD = [pytest.param(size, kw, id=size + ("_s20" if kw else "")) for size, kw in (
    ("small", {}), ("odd", {}), ("one_expert", {}), ("one_slot_one_head", {}), ("small", {"num_slots": 20}))]


def random_inputs(size, share, bsz, seed, **kw):
    """float64 on the CPU: the params of a random layer, and random (Z, A, a, Bw, c, g)
    and dY, with Z (B, H, P, dh) and dY (B, P, D)."""
    p = make_layer(size, seed=seed, share_lora_weights=share, **kw).params()
    e, h, s, dh = p.slot_embeds.shape
    z = torch.randn(bsz, h, e * s, dh, dtype=torch.float64)
    dy = torch.randn(bsz, e * s, p.expert_gamma.shape[1], dtype=torch.float64)
    return p, [z] + [getattr(p, name).detach().clone() for name in NAMES[1:]], dy


def reference_grads(p, inputs, dy):
    """float64 autograd of reference.experts: gradients of (Z, A, a, Bw, c, g)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = reference.experts(leaves[0], dataclasses.replace(p, **dict(zip(NAMES[1:], leaves[1:]))))
    return torch.autograd.grad(y, leaves, dy)


def kernel_grads(inputs, dy):
    """The kernels' fp32 gradients of (Z, A, a, Bw, c, g), on DEVICE."""
    leaves = [t.detach().to(DEVICE, torch.float32).requires_grad_() for t in inputs]
    return torch.autograd.grad(experts(*leaves), leaves, dy.to(DEVICE, torch.float32))


def assert_close(got, ref):
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g.cpu(), r) <= FP32_GRAD_TOL, (name, rel_err(g.cpu(), r))


# ------------------------------------------------------------------ float64 gradcheck
@pytest.mark.parametrize("size", ["small", "one_expert", "one_slot_one_head"])
@pytest.mark.parametrize("share", [True, False])
def test_gradcheck_float64(size, share):
    # small: r = 13; one_expert: E = 1, r = 13; one_slot_one_head: S = 1, H = 1
    _, inputs, _ = random_inputs(size, share, bsz=1, seed=30)
    inputs = [t.to(DEVICE).requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(experts, inputs, fast_mode=True)


# ------------------------------------------------------------------ fp32 against the float64 reference
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("size,kw", AWKWARD)
def test_fp32_grads_awkward_sizes(size, kw, share):
    p, inputs, dy = random_inputs(size, share, bsz=2, seed=31, **kw)
    assert_close(kernel_grads(inputs, dy), reference_grads(p, inputs, dy))


def test_fp32_grads_recommended_sizes():
    # H = 16, dh = 16, r = 17, do = 32, S = 10, D = 512: the recommended tiles; one bag and
    # E = 2, as E only sizes the grid (a program per expert and head). The recommended
    # E = 30 runs these kernels in test_triton_backward's recommended-size test, which
    # checks every expert parameter's gradient and dx (through dZ) against the reference.
    p, inputs, dy = random_inputs("recommended", True, bsz=1, seed=32, num_experts=2,
                                 auto_rank=False, lora_rank=17)  # the rank auto_rank gives at E = 30
    assert p.shared_weight.shape == (16, 16, 17) and p.expert_weights.shape == (2, 16, 17, 32)
    assert_close(kernel_grads(inputs, dy), reference_grads(p, inputs, dy))


def test_grads_are_deterministic():
    # three bags and two slot blocks per expert: partials summed over both, and over experts for A
    _, inputs, dy = random_inputs("small", True, bsz=3, seed=33, num_slots=20)
    first, second = kernel_grads(inputs, dy), kernel_grads(inputs, dy)
    for name, g1, g2 in zip(NAMES, first, second):
        assert torch.equal(g1, g2), name


# ------------------------------------------------------------------ only what is needed
def test_backward_launcher_skips_what_is_not_needed():
    _, inputs, dy = random_inputs("small", True, bsz=2, seed=34)
    z, *prms = [t.float().to(DEVICE) for t in inputs]
    dy = dy.float().to(DEVICE)
    _, inv_norm, v = experts_forward(z, *prms)
    dz_only = experts_backward(dy, z, *prms, v, inv_norm, need_param_grads=False)
    params_only = experts_backward(dy, z, *prms, v, inv_norm, need_dz=False)
    assert dz_only[0] is not None and all(g is None for g in dz_only[1:])
    assert params_only[0] is None and all(g is not None for g in params_only[1:])
    assert torch.equal(dz_only[0], experts_backward(dy, z, *prms, v, inv_norm)[0])


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("wanted", [{0}, {1, 2, 3, 4, 5}, {5}], ids=["z", "params", "gamma"])
def test_needs_input_grad(share, wanted, monkeypatch):
    backward, returned = ExpertsFunction.backward, []

    def spy(ctx, dy):  # records what ExpertsFunction.backward returns
        returned.append(backward(ctx, dy))
        return returned[-1]

    monkeypatch.setattr(ExpertsFunction, "backward", staticmethod(spy))
    p, inputs, dy = random_inputs("small", share, bsz=2, seed=35)
    ref = reference_grads(p, inputs, dy)
    leaves = [t.float().to(DEVICE).requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    experts(*leaves).backward(dy.float().to(DEVICE))
    (grads,) = returned
    for i, (name, t, g, r) in enumerate(zip(NAMES, leaves, grads, ref)):
        if i in wanted:
            assert rel_err(t.grad.cpu(), r) <= FP32_GRAD_TOL, name
        else:
            assert g is None and t.grad is None, name


# ------------------------------------------------------------------ degenerate slots
@pytest.mark.parametrize("v_norm", [0.0, 5e-9], ids=["zero", "clamped"])
def test_zero_or_clamped_norm_and_dead_relu(v_norm):
    # expert 0: Bw = 0 and c of norm v_norm, so v = c in each of its slots: exactly 0, or under
    # the 1e-8 clamp (there the norm is a constant: dv = inv * dvhat); expert 1: v > 0 (c large)
    # and g < 0, so every output is dead after the ReLU
    p, inputs, dy = random_inputs("small", True, bsz=2, seed=36)
    _, _, _, bw, c, g = inputs
    bw[0] = 0.0
    c[0] = torch.randn_like(c[0])
    c[0] *= v_norm / c[0].norm()
    c[1] = 100.0 + c[1].abs()
    g[1] = -g[1].abs()
    got = kernel_grads(inputs, dy)
    assert_close(got, reference_grads(p, inputs, dy))
    s = p.num_slots
    dz, _, _, dbw, dc, dg = got
    for dead in (dz[:, :, s:2 * s], dbw[1], dc[1], dg[1]):
        assert (dead == 0).all()
