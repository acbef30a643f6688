"""ILRA as MIL-Lab computes it, against a reference written with explicit
multi-head attention (float64), and MIL-Lab's wrapper's handling of its keys.

The golden fixtures (tests/test_millab_fidelity.py) check MIL-Lab's configs
against their code; here padding, ln, mode and the constructor's keys.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from mammoth_fast.mil import ILRA, create_model

CLOSE = dict(rtol=1e-10, atol=1e-10)


def mab_reference(block, q, kv, heads):
    """MIL-Lab's MultiHeadAttention on one bag: q (Lq, dq), kv (Lk, dk) -> (Lq, D), weights (Lq, Lk)."""
    mha = block.multihead_attention
    qp = F.linear(q, block.fc_q.weight, block.fc_q.bias)
    k = F.linear(kv, block.fc_k.weight, block.fc_k.bias)
    v = F.linear(kv, block.fc_v.weight, block.fc_v.bias)
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    d = qp.shape[1] // heads
    split = lambda t: t.reshape(t.shape[0], heads, d).transpose(0, 1)  # noqa: E731  (H, L, d)
    qh, kh, vh = split(qp @ wq.t() + bq), split(k @ wk.t() + bk), split(v @ wv.t() + bv)
    a = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1)  # (H, Lq, Lk)
    o = (a @ vh).transpose(0, 1).reshape(qp.shape[0], -1) @ mha.out_proj.weight.t() + mha.out_proj.bias

    def ln(t, m):
        return t if isinstance(m, torch.nn.Identity) else F.layer_norm(t, t.shape[-1:], m.weight, m.bias)

    o = ln(qp + o, block.ln0)
    o = ln(o + F.relu(F.linear(o, block.fc_o.weight, block.fc_o.bias)), block.ln1)
    if block.gate is not None:
        o = o * F.silu(F.linear(q, block.gate[0].weight, block.gate[0].bias))
    return o, a.mean(dim=0)


def ilra_reference(net, x, heads):
    """x (n, in_dim) -> logits (C,), pooling weights (n,)."""
    for gab in net.gab_blocks:
        h, _ = mab_reference(gab.project_forward, gab.latent[0], x, heads)
        x, _ = mab_reference(gab.project_backward, x, h, heads)
    out, a = mab_reference(net.pooling.mha, net.pooling.S[0], x, heads)
    return F.linear(out[0], net.classifier.weight, net.classifier.bias), a[0]


@pytest.mark.parametrize("ln", [True, False])
def test_ilra_equals_millabs_computation_per_bag(ln):
    """No patch embedding (the first GAB takes the 12-wide features), 3 layers, padding junk."""
    torch.manual_seed(0)
    net = ILRA(in_dim=12, num_classes=3, embed_dim=16, num_attention_layers=3, num_heads=4, topk=5, ln=ln,
               honour_ln=True).double().eval()
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0], mask[1, :2], mask[2, 1::2] = True, True, True
    h = torch.randn(3, 9, 12, dtype=torch.float64)
    h[~mask] = 1e3
    out = net(h, mask=mask, return_attention=True)
    for b in range(3):
        logits, weights = ilra_reference(net, h[b][mask[b]], heads=4)
        torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
        torch.testing.assert_close(out["attention"][b][mask[b]], weights, **CLOSE)
        assert (out["attention"][b][~mask[b]] == 0).all()


def test_ilra_takes_millabs_keys():
    net = create_model("ilra.base.uni", 2, num_attention_layers=3, topk=7, num_heads=4, embed_dim=32)
    assert len(net.gab_blocks) == 3 and isinstance(net.patch_embed, torch.nn.Identity)
    assert all(g.latent.shape == (1, 7, 32) for g in net.gab_blocks)
    assert net.gab_blocks[0].project_forward.fc_k.weight.shape == (32, 1024)
    assert net.pooling.mha.multihead_attention.num_heads == 4


def test_ln_false_is_ignored_as_millabs_wrapper_does_unless_honoured():
    with pytest.warns(UserWarning, match="honour_ln"):
        kept = ILRA(in_dim=8, embed_dim=16, num_heads=2, topk=3, ln=False)
    assert "pooling.mha.ln0.weight" in kept.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropped = ILRA(in_dim=8, embed_dim=16, num_heads=2, topk=3, ln=False, honour_ln=True)
    assert not any(".ln" in k for k in dropped.state_dict())


def test_only_classification_mode():
    with pytest.raises(ValueError, match="mode"):
        ILRA(in_dim=8, embed_dim=16, num_heads=2, topk=3, mode="survival")
