"""MIL models, part 2: Transformer, ILRA, RRT-MIL, WiKG, DTFD-MIL.

The tests every model shares (a training step through create_model with and
without Mammoth, both backends; a masked batch equals its bags one at a time;
configs, names, parameter counts) run from tests/test_mil.py, which is driven
by the registry. Here: each model against a plain single-bag implementation of
its original's computation (float64), and what is particular to each.
"""
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from einops import rearrange

from mammoth_fast import Mammoth
from mammoth_fast import reference as mammoth_reference
from mammoth_fast.mil import DTFDMIL, ENCODER_DIMS, ILRA, MODELS, TransformerMIL, WiKG, create_model
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
    d = IN_DIM if model == "ilra" else 32  # MIL-Lab's ILRA has no patch embedding: its first GAB takes in_dim
    d = IN_DIM if model == "dftd" else d  # DTFD's aggregate embeds each pseudo-bag, as MIL-Lab's
    for train in (True, False):
        net.train(train)
        for x, mask in [(tokens(2, 300, d), None), (tokens(1, 1, d), None), (tokens(1, 2, d), None),
                        (tokens(3, 3, d), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))]:
            x.requires_grad_(True)
            out = net.aggregate(x, mask, None, True)
            assert out["logits"].shape == (x.shape[0], NUM_CLASSES)
            assert out["attention"].shape == x.shape[:2]
            out["logits"].sum().backward()
            assert torch.isfinite(out["logits"]).all() and torch.isfinite(x.grad).all()
            if mask is not None:
                assert (x.grad[~mask] == 0).all()  # padding takes no part


# ---------------------------------------------------------------- Transformer

@pytest.mark.parametrize("mlp_dim", [32, -1])
def test_transformer_is_millab_encoder_per_bag(mlp_dim):
    """MIL-Lab's layer: x + MHA(LN(x)), then x + ReLU(W2 ReLU(W1 LN2(x))) when
    encoder_mlp_dim > 0 (none at -1); 'attention' is the cls row of the first
    layer's head-averaged softmax."""
    torch.manual_seed(0)
    net = TransformerMIL(in_dim=8, num_classes=3, embed_dim=16, num_attention_layers=2, num_heads=4,
                         encoder_mlp_dim=mlp_dim).double().eval()
    assert all((blk.mlp is None) == (mlp_dim < 0) for blk in net.blocks)
    x, mask = tokens(3, 7), mixed_mask(7)
    out = net.aggregate(x, mask, None, True)
    for b in range(3):
        seq = torch.cat([net.cls_token[0], x[b][mask[b]]])
        first = None
        for blk in net.blocks:
            mha = blk.attention
            qkv = lambda y: y @ mha.in_proj_weight.t() + mha.in_proj_bias  # noqa: E731
            o, a = plain_attention(blk.norm(seq)[None], qkv, 4, 0.5, mha.out_proj)
            first = a if first is None else first
            seq = seq + o[0]
            if mlp_dim > 0:
                fc1, fc2 = blk.mlp[0], blk.mlp[3]
                hidden = torch.relu(blk.norm2(seq) @ fc1.weight.t() + fc1.bias)
                seq = seq + torch.relu(hidden @ fc2.weight.t() + fc2.bias)
        torch.testing.assert_close(out["logits"][b], net.classifier(net.norm(seq[0])), **CLOSE)
        torch.testing.assert_close(out["attention"][b][mask[b]], first[0].mean(dim=0)[0, 1:], **CLOSE)


# ---------------------------------------------------------------- ILRA

def test_ilra_base_mammoth_has_a_positive_rank_and_embed_dim_wide_blocks():
    """As MIL-Lab: base has no patch embedding (the first GAB takes the in_dim features);
    with Mammoth every block is embed_dim wide. Otherwise the same aggregator."""
    for encoder in ENCODER_DIMS:
        net = create_model(f"ilra.base_mammoth.{encoder}", 2)
        assert net.patch_embed.dim == net.embed_dim == 256 and net.patch_embed.lora_rank >= 1
    assert create_model("ilra.base_mammoth.uni", 2).patch_embed.lora_rank == 17
    base, moe = (create_model(f"ilra.{c}.uni", 2).state_dict() for c in ("base", "base_mammoth"))
    assert not any(k.startswith("patch_embed.") for k in base)
    assert set(base) == {k for k in moe if not k.startswith("patch_embed.")}
    first = {"gab_blocks.0.project_forward.fc_k.weight", "gab_blocks.0.project_forward.fc_v.weight",
             "gab_blocks.0.project_backward.fc_q.weight", "gab_blocks.0.project_backward.gate.0.weight"}
    assert {k for k in base if base[k].shape != moe[k].shape} == first
    assert all(base[k].shape == (256, 1024) and moe[k].shape == (256, 256) for k in first)
    with pytest.raises(ValueError, match="rank"):  # the default width with Mammoth's default slot_dim
        create_model("ilra.base_mammoth.uni", 2, moe_args={"num_experts": 30, "slot_dim": 256})


def test_ilra_latents_and_pooling_ignore_padding():
    """Padded tokens, whatever they hold, change nothing."""
    torch.manual_seed(0)
    net = ILRA(in_dim=16, num_classes=3, embed_dim=16, num_heads=2, topk=4).double().eval()
    x, mask = tokens(3, 7), mixed_mask(7)
    out = net.aggregate(x, mask, None, True)
    junk = x.masked_fill(~mask.unsqueeze(-1), 1e3)
    torch.testing.assert_close(net.aggregate(junk, mask, None, True)["logits"], out["logits"], **CLOSE)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3, dtype=torch.float64), **CLOSE)


# RRT-MIL: tests/test_mil_rrt.py


# ---------------------------------------------------------------- WiKG

@pytest.mark.parametrize("original_relation", [False, True])
@pytest.mark.parametrize("topk", [1, 3, 5])
def test_wikg_equals_millabs_computation_per_bag(topk, original_relation):
    """Bags of 7, 3 and 3 tokens against a per-token reference (tests/test_mil_wikg.py):
    topk = 5 exceeds the small bags, which then use all they have (MIL-Lab's topk raises)."""
    from test_mil_wikg import wikg_reference

    torch.manual_seed(0)
    net = WiKG(in_dim=8, num_classes=3, embed_dim=16, topk=topk, original_relation=original_relation)
    net = net.double().eval()
    x, mask = tokens(3, 7), mixed_mask(7)
    out = net.aggregate(x, mask, None, True)
    net.block_elements = 5  # similarities a query row or two at a time: the same
    torch.testing.assert_close(net.aggregate(x, mask, None, True)["logits"], out["logits"], **CLOSE)
    for b in range(3):
        logits, weights = wikg_reference(net, x[b][mask[b]])
        torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
        torch.testing.assert_close(out["attention"][b][mask[b]], weights, **CLOSE)
        assert (out["attention"][b][~mask[b]] == 0).all()


# ---------------------------------------------------------------- DTFD-MIL

def dtfd_net(variant="base", seed=0, **kw):
    """A tiny DTFD (in_dim 8, D 16, 3 classes, float64, eval), every parameter perturbed (MIL-Lab's
    init zeros the biases). variant: 'base', or Mammoth with keep_slots ('slots') or not ('tokens')."""
    torch.manual_seed(seed)
    moe = {} if variant == "base" else dict(num_experts=2, num_slots=3, num_heads=2, slot_dim=8, backend="eager",
                                            keep_slots=variant == "slots")
    net = DTFDMIL(in_dim=8, num_classes=3, embed_dim=16, attention_dim=8, moe_args=moe, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.double().eval()


def millab_dftd(net, h, label, loss_fn, seed):
    """MIL-Lab's DFTD.forward on one bag h (n, in_dim), their loop written out: random.seed(seed),
    python's shuffle and np.array_split; each pseudo-bag embedded alone (Mammoth by the functional
    reference, which takes an empty one); raw gated scores in both tiers (softmax over each set with
    attention_softmax); the tokens ranked by the CAM score, order[:k] and order[-k:].
    -> logits (1, C), pseudo-bag logits (G, C), cls_loss, instance_loss, loss."""
    random.seed(seed)
    order = list(range(len(h)))
    random.shuffle(order)
    k = net.total_instance // net.num_group
    norm = (lambda s: s.softmax(dim=0)) if net.attention_softmax else (lambda s: s)
    preds, feats = [], []
    for chunk in np.array_split(np.array(order), net.num_group):
        sub = h[torch.as_tensor(chunk, dtype=torch.long)]
        if isinstance(net.patch_embed, Mammoth):
            x = mammoth_reference.forward(sub[None], net.patch_embed.params(), keep_slots=net.patch_embed.keep_slots)[0]
        else:
            fc1 = net.patch_embed.fc1[0]
            x = torch.relu(sub @ fc1.weight.t() + fc1.bias)
            for res in net.patch_embed.resBlocks:
                x = x + torch.relu(torch.relu(x @ res.block[0].weight.t()) @ res.block[2].weight.t())
        a = norm(net.attention(x)[:, 0])
        att = x * a[:, None]
        pooled = att.sum(0, keepdim=True)
        preds.append(net.classifier.fc(pooled))
        ranked = torch.sort((att @ net.classifier.fc.weight.t()).softmax(dim=1)[:, -1], descending=True).indices
        feats.append({"MaxMinS": x[torch.cat([ranked[:k], ranked[-k:]])], "MaxS": x[ranked[:k]],
                      "AFS": pooled}[net.distill])
    feats = torch.cat(feats)
    b = norm(net.attCls.global_attn(feats)[:, 0])
    logits = net.attCls.classifier.fc((b[:, None] * feats).sum(0, keepdim=True))
    preds = torch.cat(preds)
    cls_loss = loss_fn(logits, label)
    instance_loss = nn.CrossEntropyLoss()(preds, label.expand(len(preds)))
    return logits, preds, cls_loss, instance_loss, net.bag_weight * cls_loss + (1 - net.bag_weight) * instance_loss


DTFD_CASES = [("base", "MaxMinS", 4), ("base", "MaxMinS", 16), ("base", "MaxMinS", 40), ("base", "MaxS", 16),
              ("base", "MaxS", 4), ("base", "AFS", 4), ("slots", "MaxMinS", 4), ("slots", "MaxMinS", 16),
              ("slots", "AFS", 4), ("tokens", "MaxMinS", 16), ("tokens", "AFS", 4)]


def check_dtfd_against_millab(net, bag_sizes=(1, 3, 13, 37)):
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)  # the instance loss stays a plain cross-entropy
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(bag_sizes):
        h = torch.randn(n, 8, generator=g, dtype=torch.float64)
        label = torch.tensor([i % 3])
        logits, preds, cls_loss, instance_loss, loss = millab_dftd(net, h, label, loss_fn, seed=i)
        random.seed(i)
        out = net(h, label=label, loss_fn=loss_fn)
        torch.testing.assert_close(out["logits"], logits, **CLOSE)
        torch.testing.assert_close(out["pseudo_logits"][0], preds, **CLOSE)
        for key, value in (("cls_loss", cls_loss), ("instance_loss", instance_loss), ("loss", loss)):
            torch.testing.assert_close(out[key], value, **CLOSE)


@pytest.mark.parametrize("variant,distill,total_instance", DTFD_CASES)
def test_dtfd_equals_millabs_loop_per_bag(variant, distill, total_instance):
    """Bags of 1, 3, 13 and 37 patches in 8 pseudo-bags (some empty, some smaller than k:
    k = total_instance // 8 is 0, MIL-Lab's configs' value, 2 or 5)."""
    check_dtfd_against_millab(dtfd_net(variant, distill=distill, total_instance=total_instance))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 17, 300])
def test_dtfd_pseudo_bags_are_array_split_of_pythons_shuffle(n):
    """Bag after bag, one random.shuffle of list(range(n)) over the bag's real patches in
    order, cut as np.array_split does; a pseudo-bag's patches first, then padding."""
    net = dtfd_net(num_group=8)
    mask = torch.zeros(2, n + 3, dtype=torch.bool)
    mask[0, :n] = True
    mask[1, torch.randperm(n + 3)[:n]] = True
    random.seed(n)
    idx, member = net.pseudo_bags(mask, 2, n + 3, torch.device("cpu"))
    random.seed(n)
    for b in range(2):
        order = list(range(n))
        random.shuffle(order)
        real = mask[b].nonzero().flatten()
        for g, chunk in enumerate(np.array_split(np.array(order), 8)):
            assert member[b, g].tolist() == [True] * len(chunk) + [False] * (idx.shape[-1] - len(chunk))
            assert idx[b, g, :len(chunk)].tolist() == real[torch.as_tensor(chunk, dtype=torch.long)].tolist()


def test_dtfd_splits_come_from_rng_or_pythons_random():
    net = dtfd_net(num_group=4)
    split = lambda: net.pseudo_bags(None, 1, 300, torch.device("cpu"))[0]  # noqa: E731
    random.seed(1)
    first = split()
    net.rng = random.Random(1)  # draws what random.seed(1) does, and leaves the global random alone
    state = random.getstate()
    assert torch.equal(split(), first)
    assert random.getstate() == state
    assert not torch.equal(split(), first)
    net.rng = None
    random.seed(1)
    assert torch.equal(split(), first)


def test_dtfd_trains_a_batched_step_through_create_model():
    """Part 1's step, with MIL-Lab's loss names; B > 1 needs no special case."""
    net = tiny_model("dftd", "eager").train()
    assert isinstance(net.patch_embed, Mammoth)
    h, mask, label = padded_batch(torch.float32)
    out = net(h, mask=mask, label=label, loss_fn=nn.CrossEntropyLoss())
    assert {"instance_loss", "cls_loss", "loss"} <= set(out)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="distill"):
        create_model("dftd.base", 2, in_dim=IN_DIM, distill="MinS")
