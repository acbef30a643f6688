"""WiKG as MIL-Lab computes it, against a per-token reference (float64).

The golden fixtures (tests/test_millab_fidelity.py) check MIL-Lab's default
config against their code; here every agg_type/pool/act their code accepts, the
original WiKG's relation term, bags smaller than topk and padding.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mammoth_fast.mil import WiKG, create_model

CLOSE = dict(rtol=1e-10, atol=1e-10)
ACT = {"leaky_relu": F.leaky_relu, "relu": F.relu, "tanh": torch.tanh}


def wikg_reference(net, x, act="leaky_relu", agg_type="bi-interaction", pool="attn"):
    """MIL-Lab's WiKG aggregator on one bag x (n, D), one token at a time: neighbours
    by a full sort of its similarities, e_r = p * nb (+ (1 - p) * e_h with the original's
    relation), and torch_geometric's readouts written out (the attention one with its
    + 1e-16). -> logits (C,), readout weights (n,)."""
    n, d = x.shape
    x = (x + x.mean(dim=0)) / 2
    e_h, e_t = net.W_head(x), net.W_tail(x)
    k = min(net.topk, n)
    rows = []
    for i in range(n):
        s = (e_t @ e_h[i]) / math.sqrt(d)  # (n,)
        nb_index = torch.argsort(s, descending=True)[:k]
        nb, p = e_t[nb_index], s[nb_index].softmax(dim=0)[:, None]  # (k, D), (k, 1)
        e_r = p * nb + ((1 - p) * e_h[i] if net.original_relation else 0)
        w = (nb * torch.tanh(e_h[i] + e_r)).sum(dim=1).softmax(dim=0)  # (k,)
        rows.append(w @ nb)
    e_n = torch.stack(rows)  # (n, D)
    f = ACT[act]
    if agg_type == "bi-interaction":
        h = f(F.linear(e_h + e_n, net.linear1.weight, net.linear1.bias)) \
            + f(F.linear(e_h * e_n, net.linear2.weight, net.linear2.bias))
    else:
        z = torch.cat([e_h, e_n], dim=1) if agg_type == "sage" else e_h + e_n
        h = f(F.linear(z, net.linear.weight, net.linear.bias))
    if pool == "attn":
        g1, g2 = net.readout.gate_nn[0], net.readout.gate_nn[2]
        s = F.linear(F.leaky_relu(F.linear(h, g1.weight, g1.bias)), g2.weight, g2.bias)[:, 0]
        e = torch.exp(s - s.max())
        a = e / (e.sum() + 1e-16)
        pooled = a @ h
    elif pool == "mean":
        a = torch.full((n,), 1.0 / n, dtype=h.dtype)
        pooled = h.mean(dim=0)
    else:
        pooled, winner = h.max(dim=0)
        a = torch.bincount(winner, minlength=n).to(h.dtype) / d
    pooled = F.layer_norm(pooled, (d,), net.norm.weight, net.norm.bias)
    return F.linear(pooled, net.classifier.weight, net.classifier.bias), a


@pytest.mark.parametrize("pool", ["attn", "mean", "max"])
@pytest.mark.parametrize("agg_type,act", [("bi-interaction", "leaky_relu"), ("gcn", "relu"), ("sage", "tanh")])
def test_every_millab_option_per_bag(agg_type, act, pool):
    torch.manual_seed(0)
    net = WiKG(in_dim=8, num_classes=3, embed_dim=16, topk=3, agg_type=agg_type, pool=pool, act=act)
    net = net.double().eval()
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0], mask[1, :2], mask[2, ::2] = True, True, True  # 7, 2 (< topk) and 4 tokens
    h = torch.randn(3, 7, 8, dtype=torch.float64)
    h[~mask] = 1e3  # padding junk
    out = net(h, mask=mask, return_attention=True)
    for b in range(3):
        x = net.patch_embed(h[b][mask[b]])
        logits, weights = wikg_reference(net, x, act, agg_type, pool)
        torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
        torch.testing.assert_close(out["attention"][b][mask[b]], weights, **CLOSE)
        assert (out["attention"][b][~mask[b]] == 0).all()


def test_millabs_relation_differs_from_the_originals():
    torch.manual_seed(0)
    net = WiKG(in_dim=8, num_classes=3, embed_dim=16).double().eval()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    millab = net.aggregate(x, None, None, False)["logits"]
    net.original_relation = True
    assert not torch.allclose(net.aggregate(x, None, None, False)["logits"], millab)


def test_unused_gate_layers_load_and_get_no_gradient():
    """MIL-Lab's gate_U/V/W are in their state_dict but not in their forward."""
    net = create_model("wikg.base.uni", 2, embed_dim=32, topk=2)
    assert net.gate_U.weight.shape == (16, 32) and net.gate_W.weight.shape == (32, 16)
    net(torch.randn(5, 1024), label=torch.tensor([1]), loss_fn=torch.nn.CrossEntropyLoss())["loss"].backward()
    assert all(p.grad is None for m in (net.gate_U, net.gate_V, net.gate_W) for p in m.parameters())
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith("gate_"))


@pytest.mark.parametrize("key,value", [("agg_type", "gat"), ("pool", "sum"), ("act", "gelu")])
def test_options_millab_lacks_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        WiKG(in_dim=8, embed_dim=16, **{key: value})


def test_mean_and_max_readouts_have_no_parameters():
    for pool in ("mean", "max"):
        net = WiKG(in_dim=8, embed_dim=16, pool=pool)
        assert not any(k.startswith("readout.") for k in net.state_dict())
