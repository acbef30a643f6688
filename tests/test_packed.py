"""Packed variable-length bags (cu_seqlens) against each bag run alone, in the
eager, sdpa and triton backends (triton under the interpreter without CUDA)."""
import pytest
import torch

from conftest import DEVICE, make_layer, rel_err

LENGTHS = {"mixed": [1, 37, 5, 200], "single_patch": [1], "two": [3, 1]}
TOL = 1e-9  # float64 everywhere


def cu(lengths, dtype=torch.int32, device=DEVICE):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(dtype=dtype, device=device)


def run_grads(layer, x, dout, dweights, **kw):
    x = x.detach().requires_grad_()
    out, w = layer(x, return_weights=True, **kw)
    names, prms = zip(*layer.named_parameters())
    loss = (out * dout).sum() + (w * dweights).sum()
    grads = torch.autograd.grad(loss, (x, *prms))
    return out.detach(), w.detach(), dict(zip(("x", *names), grads))


@pytest.mark.parametrize("keep_slots", [True, False], ids=["slots", "tokens"])
@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
def test_packed_equals_bags_alone(backend, lengths, keep_slots):
    lengths = LENGTHS[lengths]
    if backend == "triton" and DEVICE.type == "cpu" and sum(lengths) > 100:
        lengths = [1, 17, 5, 40]  # the interpreter is slow; still very unequal lengths
    layer = make_layer("small", seed=4, keep_slots=keep_slots, backend=backend).to(DEVICE)
    g = torch.Generator().manual_seed(sum(lengths))
    total, p = sum(lengths), layer.num_experts * layer.num_slots
    x = torch.randn(total, layer.input_dim, generator=g, dtype=torch.float64).to(DEVICE)
    dout = torch.randn(len(lengths), p, layer.dim, generator=g, dtype=torch.float64) if keep_slots \
        else torch.randn(total, layer.dim, generator=g, dtype=torch.float64)
    dw = torch.randn(total, layer.num_experts, layer.num_heads, layer.num_slots, generator=g, dtype=torch.float64)
    dout, dw = dout.to(DEVICE), dw.to(DEVICE)

    out, w, grads = run_grads(layer, x, dout, dw, cu_seqlens=cu(lengths))
    assert out.shape == ((len(lengths), p, layer.dim) if keep_slots else (total, layer.dim))
    assert w.shape == (total, layer.num_experts, layer.num_heads, layer.num_slots)

    offsets = cu(lengths, torch.int64, "cpu").tolist()
    want_grads = {k: torch.zeros_like(v) for k, v in grads.items()}
    want_grads["x"] = torch.zeros_like(x)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        d_i = dout[i:i + 1] if keep_slots else dout[a:b][None]
        o_i, w_i, g_i = run_grads(layer, x[a:b][None], d_i, dw[a:b][None])
        assert rel_err(out[i] if keep_slots else out[a:b], o_i[0]) <= TOL
        assert rel_err(w[a:b], w_i[0]) <= TOL
        want_grads["x"][a:b] = g_i.pop("x")[0]
        for k, v in g_i.items():
            want_grads[k] += v
    for k, v in grads.items():
        want = want_grads[k]
        err = rel_err(v, want) if want.norm() > 0 else v.norm().item()
        assert err <= 1e-8, k


def test_int64_offsets_and_no_grad():
    layer = make_layer("small", seed=2, keep_slots=False, backend="sdpa")
    x = torch.randn(9, layer.input_dim, dtype=torch.float64)
    with torch.no_grad():
        a = layer(x, cu_seqlens=cu([4, 5], torch.int64, "cpu"))
        b = layer(x, cu_seqlens=cu([4, 5], torch.int32, "cpu"))
        alone = layer(x[4:][None])[0]
    assert torch.equal(a, b) and rel_err(a[4:], alone) <= TOL


@pytest.mark.parametrize("offsets, dtype, error, match", [
    ([1, 5, 9], torch.int32, ValueError, "start at 0"),
    ([0, 5, 8], torch.int32, ValueError, "end at total_N"),
    ([0, 5, 5, 9], torch.int32, ValueError, r"strictly increasing; bag\(s\) \[1\]"),
    ([0, 6, 4, 9], torch.int64, ValueError, "strictly increasing"),
    ([0, 4, 9], torch.float32, TypeError, "int32 or int64"),
    ([9], torch.int32, ValueError, "B \\+ 1 >= 2"),
])
def test_cu_seqlens_is_validated(offsets, dtype, error, match):
    layer = make_layer("small", backend="eager")
    x = torch.randn(9, layer.input_dim, dtype=torch.float64)
    with pytest.raises(error, match=match):
        layer(x, cu_seqlens=torch.tensor(offsets, dtype=dtype))


def test_cu_seqlens_excludes_mask_and_batched_feats():
    layer = make_layer("small", backend="eager")
    x = torch.randn(9, layer.input_dim, dtype=torch.float64)
    offsets = cu([4, 5], device="cpu")
    with pytest.raises(ValueError, match="either mask"):
        layer(x, mask=torch.ones(9, dtype=torch.bool), cu_seqlens=offsets)
    with pytest.raises(ValueError, match="packed"):
        layer(x[None], cu_seqlens=offsets)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cu_seqlens is on"):
            layer.cuda()(x.cuda(), cu_seqlens=offsets)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
def test_max_seqlen_pads_to_the_bound_with_the_same_result(backend):
    layer = make_layer("small", seed=6, keep_slots=False, backend=backend).to(DEVICE)
    lengths = [3, 8, 1]
    x = torch.randn(sum(lengths), layer.input_dim, dtype=torch.float64, device=DEVICE)
    offsets = cu(lengths)
    with torch.no_grad():
        want, want_w = layer(x, cu_seqlens=offsets, return_weights=True)
        for bound in (8, 13):  # the longest bag, and a looser bound (more padding)
            got, w = layer(x, cu_seqlens=offsets, max_seqlen=bound, return_weights=True)
            assert rel_err(got, want) <= TOL
            assert rel_err(w, want_w) <= TOL


@pytest.mark.parametrize("kw, match", [
    (dict(max_seqlen=7), "longest bag has 8"),
    (dict(max_seqlen=0), "positive int"),
    (dict(max_seqlen=8.0), "positive int"),
])
def test_max_seqlen_is_validated(kw, match):
    layer = make_layer("small", backend="eager")
    x = torch.randn(12, layer.input_dim, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        layer(x, cu_seqlens=cu([4, 8], device="cpu"), **kw)
    with pytest.raises(ValueError, match="goes with cu_seqlens"):
        layer(x, max_seqlen=8)


def test_packed_bags_compile_without_graph_breaks_given_max_seqlen():
    """With max_seqlen the padded shape is static: the triton backend traces
    packed bags in one graph (no host read of the offsets), and compiled forward
    and backward equal eager."""
    layer = make_layer("small", seed=8, keep_slots=False, backend="triton").to(DEVICE, torch.float32)
    lengths = [5, 1, 9]
    x = torch.randn(sum(lengths), layer.input_dim, device=DEVICE, requires_grad=True)
    offsets = cu(lengths)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(layer)(x, cu_seqlens=offsets, max_seqlen=9)
    assert explain.graph_break_count == 0, explain.break_reasons
    ref = layer(x, cu_seqlens=offsets, max_seqlen=9)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, layer.slot_embeds))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x, cu_seqlens=offsets, max_seqlen=9)
    g = torch.autograd.grad(out.square().sum(), (x, layer.slot_embeds))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
