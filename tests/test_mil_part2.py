"""MIL models, part 2: Transformer, ILRA, RRT-MIL, WiKG, DTFD-MIL.

The tests every model shares (a training step through create_model with and
without Mammoth, both backends; a masked batch equals its bags one at a time;
configs, names, parameter counts) run from tests/test_mil.py, which is driven
by the registry. Here: each model against a plain single-bag implementation of
its original's computation (float64), and what is particular to each.
"""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from einops import rearrange

from mammoth_fast import Mammoth
from mammoth_fast.mil import DTFDMIL, ENCODER_DIMS, ILRA, MODELS, RRTMIL, TransformerMIL, WiKG, create_model
from mammoth_fast.mil.rrt import region_layout
from test_mil import IN_DIM, NUM_CLASSES, padded_batch, tiny_model

PART2 = ("transformer", "ilra", "rrt", "wikg", "dftd")
CLOSE = dict(rtol=1e-10, atol=1e-10)


def tokens(bsz, t, d=16, seed=0):
    torch.manual_seed(seed)
    return torch.randn(bsz, t, d, dtype=torch.float64)


def mixed_mask(t):
    """(3, t): a full bag, a prefix and one with holes."""
    mask = torch.zeros(3, t, dtype=torch.bool)
    mask[0] = True
    mask[1, : max(1, t // 2)] = True
    mask[2, ::3] = True
    return mask


def plain_attention(x, qkv, heads, scale, proj, pe=None):
    """Multi-head softmax self-attention of each row of x (Z, N, D), no masks."""
    q, k, v = rearrange(qkv(x), "z n (three h d) -> three z h n d", three=3, h=heads)
    logits = (q * scale) @ k.transpose(-1, -2)
    if pe is not None:
        logits = logits + pe(logits)
    a = logits.softmax(dim=-1)
    return proj(rearrange(a @ v, "z h n d -> z n (h d)")), a


# ---------------------------------------------------------------- registry

def test_all_eleven_models_are_registered_and_in_the_readme():
    assert set(PART2) <= set(MODELS) and len(MODELS) == 11
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## MIL models", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+)`", section, flags=re.M))
    listed |= set(re.findall(r"^\| `[a-z_]+`, `([a-z_]+)`", section, flags=re.M))
    assert set(MODELS) <= listed, set(MODELS) - listed


@pytest.mark.parametrize("model", PART2)
def test_aggregators_take_slot_tokens_and_tiny_bags(model):
    """300 tokens (Mammoth's E*S slots, mask None) and bags of 1..3 tokens, batched and masked."""
    net = tiny_model(model, "base").double()
    for train in (True, False):
        net.train(train)
        for x, mask in [(tokens(2, 300, 32), None), (tokens(1, 1, 32), None), (tokens(1, 2, 32), None),
                        (tokens(3, 3, 32), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))]:
            x.requires_grad_(True)
            out = net.aggregate(x, mask, None, True)
            assert out["logits"].shape == (x.shape[0], NUM_CLASSES)
            assert out["attention"].shape == x.shape[:2]
            out["logits"].sum().backward()
            assert torch.isfinite(out["logits"]).all() and torch.isfinite(x.grad).all()
            if mask is not None:
                assert (x.grad[~mask] == 0).all()  # padding takes no part


# ---------------------------------------------------------------- Transformer

def test_transformer_is_plain_softmax_attention_per_bag():
    torch.manual_seed(0)
    net = TransformerMIL(in_dim=8, num_classes=3, embed_dim=16, num_layers=2, num_heads=4).double().eval()
    x, mask = tokens(3, 7), mixed_mask(7)
    out = net.aggregate(x, mask, None, True)
    for b in range(3):
        seq = torch.cat([net.cls_token[0], x[b][mask[b]]])
        for blk in net.blocks:
            mha = blk.attention
            qkv = lambda y: y @ mha.in_proj_weight.t() + mha.in_proj_bias  # noqa: E731
            o, a = plain_attention(blk.norm(seq)[None], qkv, 4, 0.5, mha.out_proj)
            seq = seq + o[0]
        torch.testing.assert_close(out["logits"][b], net.classifier(net.norm(seq[0])), **CLOSE)
        torch.testing.assert_close(out["attention"][b][mask[b]], a[0].mean(dim=0)[0, 1:], **CLOSE)


# ---------------------------------------------------------------- ILRA

def test_ilra_base_mammoth_has_a_positive_rank_and_the_base_aggregator():
    for encoder in ENCODER_DIMS:
        net = create_model(f"ilra.base_mammoth.{encoder}", 2)
        assert net.patch_embed.dim == net.embed_dim == 256 and net.patch_embed.lora_rank >= 1
    assert create_model("ilra.base_mammoth.uni", 2).patch_embed.lora_rank == 17
    base, moe = (create_model(f"ilra.{c}.uni", 2).state_dict() for c in ("base", "base_mammoth"))
    strip = lambda sd: {k: v.shape for k, v in sd.items() if not k.startswith("patch_embed.")}  # noqa: E731
    assert strip(base) == strip(moe)
    with pytest.raises(ValueError, match="rank"):  # the default width with Mammoth's default slot_dim
        create_model("ilra.base_mammoth.uni", 2, moe_args={"num_experts": 30, "slot_dim": 256})


def test_ilra_latents_and_pooling_ignore_padding():
    """Padded tokens, whatever they hold, change nothing."""
    torch.manual_seed(0)
    net = ILRA(in_dim=8, num_classes=3, embed_dim=16, num_heads=2, num_latents=4).double().eval()
    x, mask = tokens(3, 7), mixed_mask(7)
    out = net.aggregate(x, mask, None, True)
    junk = x.masked_fill(~mask.unsqueeze(-1), 1e3)
    torch.testing.assert_close(net.aggregate(junk, mask, None, True)["logits"], out["logits"], **CLOSE)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3, dtype=torch.float64), **CLOSE)


# ---------------------------------------------------------------- RRT-MIL

@pytest.mark.parametrize("t", [1, 2, 6, 9, 63, 64, 65, 300])
def test_region_layout_places_each_real_token_once_row_major(t):
    masks = [None, mixed_mask(t)]
    for mask in masks:
        bsz = 1 if mask is None else 3
        index, valid, pos = region_layout(mask, bsz, t, 8, torch.device("cpu"))
        for b in range(bsz):
            real = torch.arange(t) if mask is None else mask[b].nonzero().squeeze(1)
            n = len(real)
            side = math.ceil(math.sqrt(n) / 8) * 8
            s = side // 8
            assert int(valid[b].sum()) == n
            assert sorted(index[b][valid[b]].tolist()) == real.tolist()
            assert torch.equal(index[b].flatten()[pos[b, real]], real)  # pos inverts index
            # the i-th real token sits at row-major grid cell i
            r, j = (valid[b].nonzero()[:, k] for k in (0, 1))
            cell = ((r // 8) * s + j // s) * side + (r % 8) * s + j % s
            assert torch.equal(real[cell], index[b][valid[b]])
    if t == 300:  # Mammoth's slots: a 24 x 24 grid of 3 x 3 regions
        assert region_layout(None, 1, t, 8, torch.device("cpu"))[0].shape == (1, 64, 9)


def test_rmsa_and_crmsa_on_a_full_grid_equal_the_originals_region_partition():
    """A bag that fills its grid (16 tokens, 2 x 2 regions of 2 x 2): R-MSA with
    EPEG and CR-MSA as the original computes them with view/permute."""
    torch.manual_seed(0)
    net = RRTMIL(in_dim=8, num_classes=3, embed_dim=16, num_heads=2, region_num=2, epeg_k=3, crmsa_k=3).double().eval()
    x = tokens(1, 16)[0]
    layout = region_layout(None, 1, 16, 2, x.device)

    def partition(z):  # (16, D) -> (4 regions, 4 cells, D), the original's region_partition
        return z.view(1, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(4, 4, -1)

    def reverse(z):
        return z.view(1, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(16, -1)

    rmsa = net.rmsa[0]
    y = partition(rmsa.norm(x))
    o, _ = plain_attention(y, rmsa.attn.qkv, 2, rmsa.attn.scale, rmsa.attn.proj, pe=rmsa.attn.pe)
    expected = x + reverse(o)
    torch.testing.assert_close(rmsa(x[None], layout, None)[0], expected, **CLOSE)

    cr = net.crmsa.attn
    y = partition(net.crmsa.norm(expected))
    logits = torch.einsum("wpc,ck->wkp", y, cr.phi)
    lo, hi = logits.min(dim=-1, keepdim=True).values, logits.max(dim=-1, keepdim=True).values
    reps = torch.einsum("wpc,wkp->kwc", y, logits.softmax(dim=-1))  # (k, regions, D)
    mixed, _ = plain_attention(reps, cr.attn.qkv, 2, cr.attn.scale, cr.attn.proj)
    back = torch.einsum("kwc,wkp->wpc", mixed, (logits - lo) / (hi - lo + 1e-8) * logits.softmax(dim=1))
    torch.testing.assert_close(net.crmsa(expected[None], layout, None)[0], expected + reverse(back), **CLOSE)


def test_rrt_one_region_is_self_attention_over_the_real_tokens():
    """region_num = 1 and no EPEG: R-MSA is multi-head attention over each bag's real tokens."""
    torch.manual_seed(0)
    net = RRTMIL(in_dim=8, num_classes=3, embed_dim=16, num_heads=2, region_num=1, epeg_k=0).double().eval()
    x, mask = tokens(3, 7), mixed_mask(7)
    layer = net.rmsa[0]
    got = layer(x, region_layout(mask, 3, 7, 1, x.device), mask)
    for b in range(3):
        xb = x[b][mask[b]]
        o, _ = plain_attention(layer.norm(xb)[None], layer.attn.qkv, 2, layer.attn.scale, layer.attn.proj)
        torch.testing.assert_close(got[b][mask[b]], xb + o[0], **CLOSE)


# ---------------------------------------------------------------- WiKG

def wikg_reference(net, x):
    """The original's forward on one bag x (n, D) (torch_geometric's GlobalAttention readout written out)."""
    x = 0.5 * (x + x.mean(dim=0, keepdim=True))
    e_h, e_t = net.W_head(x), net.W_tail(x)
    sim, idx = ((e_h * net.scale) @ e_t.t()).topk(min(net.topk, len(x)), dim=-1)
    nb = e_t[idx]  # (n, k, D)
    p = sim.softmax(dim=-1)
    e_r = p.unsqueeze(-1) * nb + torch.matmul((1 - p).unsqueeze(-1), e_h.unsqueeze(1))
    ka = torch.einsum("ijk,ijk->ij", nb, torch.tanh(e_h.unsqueeze(1) + e_r)).softmax(dim=-1)
    e_n = torch.matmul(ka.unsqueeze(1), nb).squeeze(1)
    h = net.activation(net.linear1(e_h + e_n)) + net.activation(net.linear2(e_h * e_n))
    gate = net.readout(h).squeeze(-1).softmax(dim=0)
    return net.classifier(net.norm((gate.unsqueeze(-1) * h).sum(0))), gate


@pytest.mark.parametrize("topk", [1, 3, 5])
def test_wikg_equals_the_original_per_bag(topk):
    """Bags of 7, 3 and 3 tokens: topk = 5 exceeds the small bags, which then use all they have."""
    torch.manual_seed(0)
    net = WiKG(in_dim=8, num_classes=3, embed_dim=16, topk=topk).double().eval()
    x, mask = tokens(3, 7), mixed_mask(7)
    out = net.aggregate(x, mask, None, True)
    net.block_elements = 5  # similarities a query row or two at a time: the same
    torch.testing.assert_close(net.aggregate(x, mask, None, True)["logits"], out["logits"], **CLOSE)
    for b in range(3):
        logits, gate = wikg_reference(net, x[b][mask[b]])
        torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
        torch.testing.assert_close(out["attention"][b][mask[b]], gate, **CLOSE)


# ---------------------------------------------------------------- DTFD-MIL

def dtfd_net(**kw):
    torch.manual_seed(0)
    return DTFDMIL(in_dim=8, num_classes=3, embed_dim=16, attn_dim=8, **kw).double().eval()


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 17, 300])
def test_dtfd_pseudo_bags_are_array_split_of_a_permutation(n):
    net = dtfd_net(num_groups=8)
    mask = torch.zeros(2, n + 3, dtype=torch.bool)
    mask[0, :n] = True
    mask[1, torch.randperm(n + 3)[:n]] = True
    group, groups = net.pseudo_bags(mask, 2, n + 3, torch.device("cpu"))
    g = min(8, n)
    sizes = [n // g + (i < n % g) for i in range(g)]  # np.array_split
    assert groups.tolist() == [g, g]
    for b in range(2):
        assert (group[b][~mask[b]] == -1).all()
        assert torch.bincount(group[b][mask[b]], minlength=g).tolist() == sizes
    # eval: fixed by eval_seed and the bag's size alone, wherever the bag sits
    assert torch.equal(group[0][mask[0]], group[1][mask[1]])
    assert torch.equal(net.pseudo_bags(mask, 2, n + 3, torch.device("cpu"))[0], group)


def test_dtfd_training_splits_follow_the_generator():
    net = dtfd_net(num_groups=4).train()
    split = lambda: net.pseudo_bags(None, 1, 300, torch.device("cpu"))[0]  # noqa: E731
    net.generator = torch.Generator().manual_seed(1)
    first = split()
    net.generator = torch.Generator().manual_seed(1)
    assert torch.equal(split(), first)
    net.generator = torch.Generator().manual_seed(2)
    assert not torch.equal(split(), first)
    net.generator = None  # torch's global RNG
    torch.manual_seed(3)
    again = split()
    torch.manual_seed(3)
    assert torch.equal(split(), again)


def dtfd_reference(net, x, group, groups):
    """The original's loop over the pseudo-bags of one bag x (n, D)."""
    preds, feats = [], []
    k = net.instances_per_group
    for g in range(groups):
        sub = x[group == g]
        aa = net.tier1_attention(sub[None])[0].softmax(dim=-1)
        att_feats = sub * aa.unsqueeze(-1)
        pooled = att_feats.sum(0, keepdim=True)
        preds.append(net.tier1_classifier(pooled))
        cam = att_feats @ net.tier1_classifier[-1].weight.t()  # get_cam_1d
        _, order = torch.sort(cam.softmax(dim=-1)[:, -1], descending=True)
        top, bottom = order[:k], order[-k:]
        feats.append({"MaxMinS": sub[torch.cat([top, bottom])], "MaxS": sub[top], "AFS": pooled}[net.distill])
    feats = torch.cat(feats)
    w = net.tier2_attention(feats[None])[0].softmax(dim=-1)
    return net.tier2_classifier((w.unsqueeze(-1) * feats).sum(0)), torch.cat(preds)


@pytest.mark.parametrize("distill,per_group", [("MaxMinS", 1), ("MaxMinS", 3), ("MaxS", 2), ("AFS", 1)])
def test_dtfd_equals_the_original_per_bag(distill, per_group):
    """Bags of 13, 6 and 3 tokens in 4, 4 and 3 pseudo-bags of 1 to 4 tokens (some hold fewer than 2k)."""
    net = dtfd_net(num_groups=4, distill=distill, instances_per_group=per_group)
    x, mask = tokens(3, 13), mixed_mask(13)
    mask[2] = False
    mask[2, [0, 5, 11]] = True
    label = torch.tensor([2, 0, 1])
    loss_fn = nn.CrossEntropyLoss()
    out = net.aggregate(x, mask, label, True)
    out.update(net.losses(out, label, loss_fn))
    group, groups = net.pseudo_bags(mask, 3, 13, x.device)
    tier1 = []
    for b in range(3):
        logits, preds = dtfd_reference(net, x[b][mask[b]], group[b][mask[b]], int(groups[b]))
        torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
        torch.testing.assert_close(out["pseudo_logits"][b][out["pseudo_mask"][b]], preds, **CLOSE)
        tier1.append(loss_fn(preds, label[b].expand(len(preds))))
    torch.testing.assert_close(out["tier1_loss"], torch.stack(tier1).mean(), **CLOSE)
    torch.testing.assert_close(out["tier2_loss"], loss_fn(out["logits"], label), **CLOSE)
    torch.testing.assert_close(out["loss"], 0.7 * out["tier2_loss"] + 0.3 * out["tier1_loss"], **CLOSE)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3, dtype=torch.float64), **CLOSE)


def test_dtfd_trains_a_batched_step_through_create_model():
    """Part 1's step, with the tier losses; B > 1 needs no special case."""
    net = tiny_model("dftd", "eager").train()
    assert isinstance(net.patch_embed, Mammoth)
    h, mask, label = padded_batch(torch.float32)
    out = net(h, mask=mask, label=label, loss_fn=nn.CrossEntropyLoss())
    assert {"tier1_loss", "tier2_loss", "loss"} <= set(out)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="distill"):
        create_model("dftd.base", 2, in_dim=IN_DIM, distill="MinS")
