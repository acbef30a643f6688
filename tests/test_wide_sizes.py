"""Layer sizes whose tiles do not fit one block: head widths dh and do wider
than a slice (streamed in chunks, one program per slice), ranks wider than a
chunk, and queries wider than the fused GEMM's row (C > 512: library GEMM, then
the norm kernel). The whole layer, forward and every gradient, against the
float64 reference, in fp32 and fp64 (whose tiles are 16 wide: every path
chunked). On CPU the kernels run under TRITON_INTERPRET=1."""
import pytest
import torch

from conftest import DEVICE, make_layer, rel_err
from mammoth_fast import Mammoth
from mammoth_fast.kernels.combine import combine_dkdy_meta, combine_dq_meta, combine_meta
from mammoth_fast.kernels.dispatch import dispatch_dq_meta, dispatch_meta
from mammoth_fast.kernels.experts import experts_meta
from mammoth_fast.kernels.query import FUSED_MAX_C

WIDE = dict(input_dim=40, dim=140, num_experts=2, num_slots=3, num_heads=2, slot_dim=80, auto_rank=False,
            lora_rank=40)  # dh 40, do 70, r 40
WIDE_QUERY = dict(input_dim=24, dim=32, num_experts=2, num_slots=2, num_heads=8, slot_dim=520, auto_rank=False,
                  lora_rank=5)  # C 520 > FUSED_MAX_C, dh 65


def test_the_sizes_take_the_chunked_paths():
    fp32 = torch.float32
    assert dispatch_meta(6, 40, fp32)["NUM_DV"] == 2 and dispatch_dq_meta(6, 40, fp32)["NUM_DV"] == 2
    assert combine_meta(6, 40, 70, fp32)["NUM_VO"] == 3 and combine_dq_meta(6, 40, 70, fp32)["NUM_VH"] == 2
    assert combine_dkdy_meta(6, 40, 70, fp32)["NUM_V"] == 3
    meta = experts_meta(3, 40, 40, 70, fp32)
    assert meta["NUM_VO"] == 3 and meta["BLOCK_R"] < 40 and meta["BLOCK_DH"] < 40
    assert WIDE_QUERY["slot_dim"] > FUSED_MAX_C


def _layer(cfg, dtype, seed, **kw):
    """The float64 reference layer and its copy in ``dtype`` with the triton backend."""
    ref = make_layer(cfg, seed=seed, **kw)
    layer = Mammoth(**cfg, **kw, backend="triton").to(DEVICE, dtype).eval()
    layer.load_state_dict(ref.state_dict())
    return ref, layer


CASES = [pytest.param(WIDE, ks, share, torch.float32, id=f"wide_heads-{'slots' if ks else 'tokens'}-{'shared' if share else 'per_expert'}-fp32")
         for ks in (True, False) for share in (True, False)] + [
    pytest.param(WIDE, False, False, torch.float64, id="wide_heads-tokens-per_expert-fp64"),  # every path in 16-wide chunks
    # keep_slots=False: the kernels of keep_slots=True and the combine (keep_slots=True with
    # wide heads: the wide_heads-slots cases above)
    pytest.param(WIDE_QUERY, False, True, torch.float32, id="wide_query-tokens-fp32"),
]


@pytest.mark.parametrize("cfg, keep_slots, share, dtype", CASES)
def test_forward_and_grads_match_the_reference(cfg, keep_slots, share, dtype):
    ref, layer = _layer(cfg, dtype, seed=7, keep_slots=keep_slots, share_lora_weights=share)
    x = torch.randn(2, 24, cfg["input_dim"], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False
    out_ref = ref(x, mask=mask)
    g = torch.randn_like(out_ref)
    want = torch.autograd.grad(out_ref, [x, *ref.parameters()], g)
    xd = x.detach().to(DEVICE, dtype).requires_grad_()
    out = layer(xd, mask=mask.to(DEVICE))
    got = torch.autograd.grad(out, [xd, *layer.parameters()], g.to(DEVICE, dtype))
    tol_out, tol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-12)
    assert rel_err(out.cpu(), out_ref) <= tol_out
    names = ["x", *(n for n, _ in ref.named_parameters())]
    for name, a, b in zip(names, got, want):
        assert rel_err(a.cpu(), b) <= tol_grad, (name, rel_err(a.cpu(), b))
