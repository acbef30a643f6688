"""The eager layer against the authors' mammoth-moe 0.1.2 (the external oracle)."""
import math

import pytest
import torch

from conftest import RECOMMENDED, SIZES, make_layer
from mammoth_fast import Mammoth

mammoth = pytest.importorskip("mammoth", reason="mammoth-moe 0.1.2 is the external oracle (pip install mammoth-moe==0.1.2)")

PARITY_SIZES = ["recommended", "small", "one_expert", "one_slot_one_head"]  # upstream needs Din % H == 0


def upstream_twin(ours: Mammoth, size: str, **kw) -> torch.nn.Module:
    up = mammoth.Mammoth(**{**SIZES[size], **kw}).double().eval()
    up.load_state_dict(ours.state_dict(), strict=True)
    return up


@pytest.mark.parametrize("size", PARITY_SIZES)
@pytest.mark.parametrize("keep_slots", [True, False])
@pytest.mark.parametrize("use_layernorm", [True, False])
@pytest.mark.parametrize("batch", [None, 1, 3], ids=["unbatched", "B1", "B3"])
def test_outputs_weights_and_gradients_match_upstream(size, keep_slots, use_layernorm, batch):
    kw = dict(keep_slots=keep_slots, use_layernorm=use_layernorm)
    ours = make_layer(size, seed=1, backend="eager", **kw)
    up = upstream_twin(ours, size, **kw)
    n = 23 if size == "recommended" else 37
    shape = (n, SIZES[size]["input_dim"]) if batch is None else (batch, n, SIZES[size]["input_dim"])
    x = torch.randn(*shape, dtype=torch.float64)
    x_ours, x_up = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_ours, w_ours = ours(x_ours, return_weights=True)
    out_up, w_up = up(x_up, return_weights=True)
    assert out_ours.shape == out_up.shape
    assert w_ours.shape == w_up.shape
    assert (out_ours - out_up).abs().max().item() <= 1e-10
    assert (w_ours - w_up).abs().max().item() <= 1e-10

    grad_out = torch.randn_like(out_up)
    weight_grad = torch.randn_like(w_up)  # the returned weights are differentiable too
    ((out_ours * grad_out).sum() + (w_ours * weight_grad).sum()).backward()
    ((out_up * grad_out).sum() + (w_up * weight_grad).sum()).backward()
    assert (x_ours.grad - x_up.grad).abs().max().item() <= 1e-10
    up_params = dict(up.named_parameters())
    for name, prm in ours.named_parameters():
        assert prm.grad is not None, name
        assert (prm.grad - up_params[name].grad).abs().max().item() <= 1e-10, name


@pytest.mark.parametrize("use_layernorm", [True, False])
def test_state_dict_round_trips_both_ways(use_layernorm):
    kw = dict(RECOMMENDED, use_layernorm=use_layernorm)
    torch.manual_seed(3)
    up = mammoth.Mammoth(**kw)
    ours = Mammoth(**kw)
    assert list(ours.state_dict()) == list(up.state_dict())
    for key, value in up.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    ours.load_state_dict(up.state_dict(), strict=True)
    for key, value in up.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    torch.manual_seed(4)
    ours2 = Mammoth(**kw)
    up.load_state_dict(ours2.state_dict(), strict=True)
    for key, value in ours2.state_dict().items():
        assert torch.equal(up.state_dict()[key], value), key


def test_unshared_state_dict_keys_and_shapes_match_upstream():
    # upstream's unshared forward crashes (SPEC section 9), but its layout is the contract
    kw = dict(SIZES["small"], share_lora_weights=False)
    up, ours = mammoth.Mammoth(**kw), Mammoth(**kw)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in up.state_dict().items()}
    ours.load_state_dict(up.state_dict(), strict=True)
    up.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("share", [True, False])
def test_default_initialization_statistics_match_upstream(share):
    kw = dict(RECOMMENDED, share_lora_weights=share)
    torch.manual_seed(5)
    up = dict(mammoth.Mammoth(**kw).named_parameters())
    torch.manual_seed(6)  # independent draws: the distributions must agree, not the values
    ours = dict(Mammoth(**kw).named_parameters())
    assert ours.keys() == up.keys()
    for name, a in ours.items():
        a, b = a.detach().double(), up[name].detach().double()
        if b.std() == 0:
            assert torch.equal(a, b), name  # constant inits: ones and zeros
            continue
        sigma, n = b.std().item(), b.numel()
        assert abs(a.mean().item() - b.mean().item()) <= 6 * sigma * math.sqrt(2 / n), name
        assert abs(a.std().item() - sigma) <= 6 * sigma * math.sqrt(2 / n), name
        if name != "expert_heads.lora_layers.shared_bias":  # uniform inits share their bound
            assert a.abs().max().item() == pytest.approx(b.abs().max().item(), rel=0.05), name


def test_buffers_match_upstream():
    up = mammoth.Mammoth(**SIZES["small"])
    ours = Mammoth(**SIZES["small"])
    assert dict(ours.named_buffers()).keys() == dict(up.named_buffers()).keys()
    for attr in ("input_dim", "num_experts", "num_heads", "num_slots", "keep_slots", "slot_dropout",
                 "slot_dim", "lora_rank", "head_dim", "head_dim_input"):
        assert getattr(ours, attr) == getattr(up, attr), attr
