"""The sdpa backend (dispatch and combine as torch's scaled_dot_product_attention):
outputs and every gradient against autograd of the float64 reference (SPEC
section 10), masks, training, half precision, and no N x H x P tensor."""
import copy

import pytest
import torch
from torch.func import functional_call

from conftest import LargestTensor, make_layer, rel_err
from gradients import FP32_OUT_TOL, assert_close, layer_grads, random_batch, random_mask, reference_grads
from mammoth_fast import Mammoth, reference


def sdpa_layer(ref: Mammoth, dtype=torch.float32) -> Mammoth:
    """A copy of a float64 layer in ``dtype`` with the sdpa backend (same mode)."""
    layer = copy.deepcopy(ref).to(dtype)
    layer.backend = "sdpa"
    return layer


# ------------------------------------------------------------------ fp32 vs float64
@pytest.mark.parametrize("size,b,n", [("recommended", 1, 24), ("small", 2, 1), ("small", 3, 70), ("odd", 2, 33),
                                      ("one_expert", 2, 9), ("one_slot_one_head", 2, 17)])
@pytest.mark.parametrize("keep_slots", [True, False])
@pytest.mark.parametrize("use_layernorm", [True, False])
def test_outputs_and_grads_match_reference_fp32(size, b, n, keep_slots, use_layernorm):
    ref = make_layer(size, seed=40, keep_slots=keep_slots, use_layernorm=use_layernorm)
    x, dout = random_batch(ref, b, n, seed=41)
    assert_close(layer_grads(sdpa_layer(ref), x, dout), reference_grads(ref, x, dout))


@pytest.mark.parametrize("keep_slots", [True, False])
@pytest.mark.parametrize("share", [True, False])
def test_masked_unshared_outputs_weights_and_grads_match_reference(keep_slots, share):
    ref = make_layer("odd", seed=42, keep_slots=keep_slots, share_lora_weights=share)
    x, dout = random_batch(ref, 3, 40, seed=43)
    mask = random_mask(3, 40, seed=44)
    layer = sdpa_layer(ref)
    assert_close(layer_grads(layer, x, dout, mask), reference_grads(ref, x, dout, mask))
    with torch.no_grad():
        _, w = layer(x.float(), return_weights=True, mask=mask)
        _, inter = reference.forward(x, ref.params(), keep_slots=keep_slots, mask=mask, return_intermediates=True)
    assert rel_err(w, reference.dispatch_layout(inter["Dw"], ref.num_experts)) <= FP32_OUT_TOL
    assert (w[~mask] == 0).all()


@pytest.mark.parametrize("keep_slots", [True, False])
def test_masked_batch_equals_unpadded_bags_alone(keep_slots):
    ref = make_layer("small", seed=45, keep_slots=keep_slots)
    layer = sdpa_layer(ref)
    lengths = [50, 1, 23]
    x, dout = random_batch(ref, 3, 50, seed=46)
    mask = torch.arange(50)[None] < torch.tensor(lengths)[:, None]
    x[~mask] = 1e3  # padding content must not leak
    x = x.float().requires_grad_()
    out, w = layer(x, return_weights=True, mask=mask)
    (dx,) = torch.autograd.grad(out, [x], dout.float())
    for b, n in enumerate(lengths):
        xb = x[b:b + 1, :n].detach().requires_grad_()
        alone, alone_w = layer(xb, return_weights=True)
        got = out[b] if keep_slots else out[b, :n]
        torch.testing.assert_close(got, alone[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w[b, :n], alone_w[0], rtol=1e-5, atol=1e-7)
        (dxb,) = torch.autograd.grad(alone, [xb], dout[b:b + 1, : alone.shape[1]].float())
        torch.testing.assert_close(dx[b, :n], dxb[0], rtol=1e-4, atol=1e-6)
    assert (w[~mask] == 0).all() and (dx[~mask] == 0).all()
    if not keep_slots:
        assert (out[~mask] == 0).all()


@pytest.mark.parametrize("keep_slots", [True, False])
def test_peaked_logits_stay_finite(keep_slots):
    ref = make_layer("small", seed=47, keep_slots=keep_slots)
    with torch.no_grad():  # norm gammas of 8: logits of several hundred, a naive exp overflows
        ref.norm.gamma.uniform_(7.0, 9.0)
        ref.slot_norm.gamma.uniform_(7.0, 9.0)
    x, dout = random_batch(ref, 2, 50, seed=48)
    logits = reference.forward(x, ref.params(), return_intermediates=True)[1]["L"]
    assert logits.abs().max() > 200
    got = layer_grads(sdpa_layer(ref), x, dout)
    assert all(torch.isfinite(g).all() for g in got[1].values())
    assert_close(got, reference_grads(ref, x, dout))


# ------------------------------------------------------------------ float64 gradcheck
@pytest.mark.parametrize("keep_slots", [True, False])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "dropouts"])
def test_gradcheck_float64(keep_slots, training):
    # every input at once, masked batch, the returned weights too; in training
    # with both dropouts, the masks redrawn from one seed on every call
    torch.manual_seed(62)
    layer = Mammoth(input_dim=5, dim=6, num_experts=2, num_slots=3, num_heads=2, slot_dim=4, auto_rank=False,
                    lora_rank=2, keep_slots=keep_slots, dropout=0.2, slot_dropout=0.4, backend="sdpa")
    layer = layer.double().train(training)
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    names, prms = zip(*layer.named_parameters())

    def run(x, *params):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return functional_call(layer, dict(zip(names, params)), (x,), dict(return_weights=True, mask=mask))

    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, *(p.detach().requires_grad_() for p in prms)))


# ------------------------------------------------------------------ training mode
@pytest.mark.parametrize("keep_slots", [True, False])
def test_training_grads_match_reference_given_the_same_masks(keep_slots):
    ref = make_layer("odd", seed=49, keep_slots=keep_slots, dropout=0.25, slot_dropout=0.3).train()
    x, dout = random_batch(ref, 2, 60, seed=50)
    mask = random_mask(2, 60, seed=51)
    torch.manual_seed(52)
    got = layer_grads(sdpa_layer(ref), x, dout, mask)
    torch.manual_seed(52)  # the backend's draws, replayed
    slot_keep, y_keep = ref._draw_keep_masks(x)
    assert 0.67 < slot_keep.float().mean() < 0.73 and 0.72 < y_keep.float().mean() < 0.78
    assert_close(got, reference_grads(ref, x, dout, mask, slot_keep, y_keep))


@pytest.mark.parametrize("n", [1, 40])
def test_slot_dropped_everywhere_gets_zero_not_nan(n):
    # n = 1: slots dropped for the whole bag (Z = 0); n = 40 with P = 4 slots per
    # head: patches whose every slot is dropped (combine output 0)
    ref = make_layer("one_slot_one_head", seed=53, keep_slots=False, dropout=0.0, slot_dropout=0.5).train()
    x, dout = random_batch(ref, 2, n, seed=54)
    torch.manual_seed(55)
    got = layer_grads(sdpa_layer(ref), x, dout)
    torch.manual_seed(55)
    slot_keep, _ = ref._draw_keep_masks(x)
    assert (~slot_keep.any(dim=1)).any() if n == 1 else (~slot_keep.any(dim=-1)).any()
    assert all(torch.isfinite(g).all() for g in got[1].values())
    assert_close(got, reference_grads(ref, x, dout, slot_keep=slot_keep))


# ------------------------------------------------------------------ the N*H*P rule
@pytest.mark.parametrize("keep_slots", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("slot_dropout", [0.0, 0.3])
def test_no_tensor_of_size_n_h_p_is_made(keep_slots, masked, slot_dropout):
    # training (expert-output dropout on); dh = 4, do = 8: combine pads q and K to 8
    cfg = dict(input_dim=24, dim=32, num_experts=4, num_slots=8, num_heads=4, slot_dim=16, auto_rank=False,
               lora_rank=3, keep_slots=keep_slots, dropout=0.1, slot_dropout=slot_dropout)
    layer = Mammoth(**cfg, backend="sdpa").train()
    b, n = 2, 400
    nhp = b * n * 4 * 32
    x = torch.randn(b, n, 24, requires_grad=True)
    mask = random_mask(b, n, seed=56) if masked else None
    with LargestTensor() as fwd:
        out = layer(x, mask=mask)
    with LargestTensor() as bwd:
        torch.autograd.grad(out, [x, *layer.parameters()], torch.randn_like(out))
    # the largest are the padded q and out (N * D) or feats and dx (N * Din)
    assert bwd.largest <= nhp // 4, (bwd.largest, nhp)
    if slot_dropout:
        assert fwd.largest == nhp  # documented: the (B, N, H, P) keep-mask's draw
    else:
        assert fwd.largest <= nhp // 4, (fwd.largest, nhp)
    with torch.no_grad(), LargestTensor() as probe:
        layer.eval()(x, mask=mask, return_weights=True)
    assert probe.largest >= nhp  # the dispatch weights, made only on request


# ------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep_slots", [True, False])
def test_half_precision_within_twice_eager_error(dtype, keep_slots):
    ref = make_layer("small", seed=57, keep_slots=keep_slots)
    x, _ = random_batch(ref, 2, 80, seed=58)
    want = reference.forward(x, ref.params(), keep_slots=keep_slots)
    errs = {}
    for backend in ("eager", "sdpa"):
        layer = sdpa_layer(ref, dtype)
        layer.backend = backend
        with torch.no_grad():
            out = layer(x.to(dtype))
        assert out.dtype == dtype
        errs[backend] = rel_err(out, want)
    assert errs["sdpa"] <= max(2 * errs["eager"], 1e-3) and errs["sdpa"] <= 2e-2, errs


@pytest.mark.parametrize("keep_slots", [True, False])
def test_bf16_autocast_outputs_and_grads_within_twice_eager_error(keep_slots):
    # SPEC section 10: within 2x the eager layer's bf16 error, and <= 2e-2 where
    # the eager layer itself meets that bound
    ref = make_layer("small", seed=59, keep_slots=keep_slots)
    x, dout = random_batch(ref, 2, 50, seed=60)
    out_ref, grads_ref = reference_grads(ref, x, dout)
    errs = {}
    for backend in ("eager", "sdpa"):
        layer = sdpa_layer(ref)
        layer.backend = backend
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = layer_grads(layer, x, dout)
        errs[backend] = {"out": rel_err(out, out_ref), **{k: rel_err(g, grads_ref[k]) for k, g in grads.items()}}
    for name, err in errs["sdpa"].items():
        eager = errs["eager"][name]
        assert err <= max(2 * eager, 1e-3) and (err <= 2e-2 or eager > 2e-2), (name, err, eager)


def test_auto_backend_is_sdpa_on_cpu():
    ref = make_layer("small", seed=61)
    layer = copy.deepcopy(ref).float()
    x = torch.randn(2, 30, ref.input_dim)
    assert layer.backend == "auto" and layer.resolve_backend(x) == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), sdpa_layer(ref)(x), rtol=0, atol=0)
