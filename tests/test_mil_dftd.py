"""DTFD-MIL (MIL-Lab's ``dftd``): what is particular to it beyond tests/test_mil_part2.py.

The loop reference (test_mil_part2.millab_dftd) is checked here against the outputs
MIL-Lab's own code recorded in the golden fixtures, so that the tests comparing our
batched model with it compare with MIL-Lab.
"""
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mammoth_fast.mil import DTFDMIL, create_model
from test_mil import IN_DIM, M, padded_batch
from test_mil_part2 import CLOSE, DTFD_CASES, check_dtfd_against_millab, dtfd_net, millab_dftd

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "millab").glob("dftd.*.pt"))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_the_loop_reference_gives_their_fixture_outputs(path, tmp_path):
    fixture = torch.load(path, weights_only=True)
    torch.save(fixture["state_dict"], tmp_path / "theirs.pt")
    net = create_model(f"{fixture['name']}.uni.none", fixture["num_classes"],
                       checkpoint_path=str(tmp_path / "theirs.pt"), in_dim=fixture["in_dim"],
                       **fixture["overrides"]).double().eval()
    for case in fixture["cases"]:
        with torch.no_grad():
            logits, _, _, _, loss = millab_dftd(net, case["h"][0], case["label"], nn.CrossEntropyLoss(), case["seed"])
        torch.testing.assert_close(logits, case["results"]["logits"], rtol=0, atol=1e-9)
        torch.testing.assert_close(loss, case["results"]["loss"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant,distill,total_instance", DTFD_CASES)
def test_attention_softmax_is_the_loop_with_softmax_in_both_tiers(variant, distill, total_instance):
    """The one switch (the DTFD paper's normalisation): softmax over each pseudo-bag's
    tokens and over the distilled features (duplicates counted, as in their concatenation)."""
    check_dtfd_against_millab(dtfd_net(variant, distill=distill, total_instance=total_instance,
                                       attention_softmax=True))


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("distill,total_instance", [("MaxMinS", 0), ("MaxMinS", 4), ("MaxS", 4), ("AFS", 0)])
def test_attention_is_each_tokens_weight_in_the_tier2_feature(distill, total_instance, softmax):
    """logits = tier-2 fc(sum_t attention_t x_t), x_t = patch_embed(h_t) (per patch without
    Mammoth); zero on padding; with softmax and no empty pseudo-bag the weights sum to 1.
    Two pseudo-bags: k = total_instance // 2."""
    net = DTFDMIL(in_dim=IN_DIM, num_classes=3, embed_dim=16, attention_dim=8, num_group=2, distill=distill,
                  total_instance=total_instance, attention_softmax=softmax).double().eval()
    h, mask, _ = padded_batch(torch.float64)
    random.seed(0)
    out = net(h, mask=mask, return_attention=True)
    x = net.patch_embed(h)  # (B, M, D)
    w = out["attention"]  # (B, M)
    torch.testing.assert_close(out["logits"], net.attCls.classifier.fc(torch.einsum("bm,bmd->bd", w, x)), **CLOSE)
    assert (w[~mask] == 0).all()
    if softmax:
        torch.testing.assert_close(w.sum(dim=1), torch.ones(3, dtype=torch.float64), **CLOSE)
    if distill == "MaxMinS" and total_instance == 0:  # k = 0 keeps every patch once: w = its tier-2 weight
        for b in range(3):
            scores = net.attCls.global_attn(x[b][mask[b]])[:, 0]
            torch.testing.assert_close(w[b][mask[b]], scores.softmax(dim=0) if softmax else scores, **CLOSE)


def test_slot_attention_weighs_each_pseudo_bags_slot_tokens():
    """Under keep_slots the tokens are E*S per pseudo-bag (Mammoth on each): 'attention'
    (B, G*E*S) weighs them, pseudo-bag after pseudo-bag."""
    net = dtfd_net("slots", num_group=3)
    h, mask, _ = padded_batch(torch.float64)
    h = h[..., :8]
    random.seed(0)
    out = net(h, mask=mask, return_attention=True)
    random.seed(0)
    idx, member = net.pseudo_bags(mask, 3, M, h.device)
    tokens, _ = net.embed_pseudo_bags(h[torch.arange(3)[:, None, None], idx], member)  # (B, G, E*S, D)
    assert out["attention"].shape == (3, 3 * 6)
    torch.testing.assert_close(
        out["logits"], net.attCls.classifier.fc(torch.einsum("bt,btd->bd", out["attention"], tokens.flatten(1, 2))),
        **CLOSE)


def test_maxs_with_k_zero_distils_nothing_as_millab():
    """MIL-Lab's configs give k = 4 // 8 = 0: MaxS keeps no instance, so the logits are the
    tier-2 classifier's bias (their torch.cat of empty selections)."""
    net = dtfd_net(distill="MaxS")
    random.seed(0)
    out = net(torch.randn(20, 8, dtype=torch.float64))
    torch.testing.assert_close(out["logits"][0], net.attCls.classifier.fc.bias, **CLOSE)


def test_forward_draws_one_shuffle_per_bag_from_pythons_random():
    """As MIL-Lab: random.shuffle(list(range(n))) once per bag, bag after bag, in eval too."""
    net = dtfd_net(num_group=3)
    h, mask, _ = padded_batch(torch.float64)
    random.seed(5)
    net(h[..., :8], mask=mask)
    after = random.getstate()
    random.seed(5)
    for n in mask.sum(dim=1).tolist():
        random.shuffle(list(range(n)))
    assert random.getstate() == after


def test_a_batch_equals_its_bags_in_order_from_the_same_rng():
    """With model.rng (a random.Random), a padded batch gives what its bags give one at a
    time from the same generator state; the same bag twice in a batch gets two splits."""
    net = dtfd_net(num_group=3)
    h, mask, _ = padded_batch(torch.float64)
    h = h[..., :8]
    net.rng = random.Random(11)
    out = net(h, mask=mask, return_attention=True)
    net.rng = random.Random(11)
    for b in range(3):
        alone = net(h[b][mask[b]], return_attention=True)
        torch.testing.assert_close(out["logits"][b:b + 1], alone["logits"], **CLOSE)
        torch.testing.assert_close(out["attention"][b:b + 1, mask[b]], alone["attention"], **CLOSE)
    twice = net(torch.stack([h[0], h[0]]))
    assert not torch.allclose(twice["logits"][0], twice["logits"][1])


def test_constructor_takes_millabs_keys_and_checks_them():
    keys = dict(embed_dim=16, attention_dim=8, num_residuals=2, dropout=0.25, attention_drop=0.25, distill="AFS",
                num_group=4, total_instance=8, bag_weight=0.5, moe_args={})
    one = DTFDMIL(in_dim=8, num_classes=2, num_fc_layers=1, **keys)
    three = DTFDMIL(in_dim=8, num_classes=2, num_fc_layers=3, **keys)  # unused, as in MIL-Lab
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in three.state_dict().items()}
    assert len(one.patch_embed.resBlocks) == 2 and one.instance_per_group == 2
    for bad in (dict(distill="MinS"), dict(num_group=0), dict(total_instance=-1)):
        with pytest.raises(ValueError, match="distill|num_group"):
            DTFDMIL(in_dim=8, **bad)
