"""MIL models with a Mammoth patch embedding (mammoth_fast.mil) and create_model.

Forward/backward tests use tiny sizes: the triton backend runs under the
interpreter on CPU.
"""
import json
import random
from importlib.resources import files

import pytest
import torch
import torch.nn as nn
from einops import rearrange

from mammoth_fast import Mammoth
from mammoth_fast.mil import (CONFIGS, ENCODER_DIMS, MODELS, create_model, model_names, parameter_counts,
                              parameter_table)
from mammoth_fast.mil.nystrom import NystromAttention

IN_DIM, NUM_CLASSES, M = 24, 3, 9
E, S = 2, 3  # tiny Mammoth: E*S = 6 slot tokens
# MIL-Lab's config keys, shrunk
TINY = {"abmil": dict(attn_dim=16), "clam": dict(attention_dim=16, k_sample=2), "dsmil": dict(attn_dim=16),
        "transmil": dict(num_heads=2), "meanmil": {}, "maxmil": {}, "transformer": dict(num_heads=2, encoder_mlp_dim=32),
        "ilra": dict(num_heads=2, topk=3),
        "rrt": dict(n_heads=2, region_num=2, trans_dim=8, mlp_dim=32, num_landmarks=4),
        "wikg": dict(topk=3), "dftd": dict(attention_dim=8, num_group=3)}
# (backend, keep_slots) of the patch embedding; None: the base config (Linear + ReLU)
VARIANTS = {"base": None, "eager": ("eager", True), "eager-tokens": ("eager", False),
            "triton": ("triton", True), "triton-tokens": ("triton", False)}
AUX_LOSSES = {"clam": {"instance_loss", "cls_loss"}, "dsmil": set()}  # dsmil: MIL-Lab's one loss


def tiny_model(model: str, variant: str, seed: int = 0):
    torch.manual_seed(seed)
    if VARIANTS[variant] is None:
        return create_model(f"{model}.base", NUM_CLASSES, in_dim=IN_DIM, embed_dim=32, **TINY[model])
    backend, keep_slots = VARIANTS[variant]
    moe_args = dict(num_experts=E, num_slots=S, num_heads=2, slot_dim=8, keep_slots=keep_slots, backend=backend)
    return create_model(f"{model}.base_mammoth", NUM_CLASSES, in_dim=IN_DIM, embed_dim=32, moe_args=moe_args,
                        **TINY[model])


def padded_batch(dtype):
    """Three bags in one (3, M) batch: full, a prefix, and one with holes; padding holds large junk."""
    mask = torch.zeros(3, M, dtype=torch.bool)
    mask[0] = True
    mask[1, :5] = True
    mask[2, [0, 2, 3, 7]] = True
    h = torch.randn(3, M, IN_DIM, dtype=dtype)
    h[~mask] = 1e3 * torch.randn(int((~mask).sum()), IN_DIM, dtype=dtype)
    return h, mask, torch.tensor([1, 0, 2])


def attention_shape(model, b, tokens):
    return (b, NUM_CLASSES, tokens) if model == "dsmil" else (b, tokens)


def slot_tokens(model):
    """Tokens under keep_slots: E*S, or E*S per pseudo-bag for DTFD (Mammoth runs on each, as in MIL-Lab)."""
    return E * S * (TINY["dftd"]["num_group"] if model == "dftd" else 1)


@pytest.mark.parametrize("variant", ["base", "eager", "triton"])
@pytest.mark.parametrize("model", list(MODELS))
def test_trains_a_step(model, variant):
    net = tiny_model(model, variant).train()
    h, mask, label = padded_batch(torch.float32)
    out = net(h, mask=mask, label=label, loss_fn=nn.CrossEntropyLoss(), return_attention=True,
              return_moe_weights=True)
    mammoth = VARIANTS[variant] is not None
    assert isinstance(net.patch_embed, Mammoth) == mammoth
    assert out["logits"].shape == (3, NUM_CLASSES)
    assert out["attention"].shape == attention_shape(model, 3, slot_tokens(model) if mammoth else M)
    if mammoth:
        assert out["moe_weights"].shape == (3, M, E, 2, S)
    else:
        assert out["moe_weights"] is None
    assert AUX_LOSSES.get(model, set()) <= set(out)
    for key, value in out.items():
        assert value is None or torch.isfinite(value).all(), key
    assert out["loss"].dim() == 0

    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out["loss"].backward()
    assert all(p.grad is not None for p in net.patch_embed.parameters())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.patch_embed.parameters()))

    one = net.eval()(h[0])  # (M, in_dim): one bag, B = 1
    assert one["logits"].shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model", list(MODELS))
def test_batched_masked_equals_one_bag_at_a_time(model, variant):
    net = tiny_model(model, variant, seed=1).double().eval()
    h, mask, label = padded_batch(torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(loss_fn=loss_fn, return_attention=True, return_moe_weights=True)
    random.seed(0)  # DTFD draws its pseudo-bags from python's random, bag after bag: the bags alone
    out = net(h, mask=mask, label=label, **kw)  # run in order from the same state get the same splits
    slots = VARIANTS[variant] is not None and VARIANTS[variant][1]
    close = dict(rtol=1e-10, atol=1e-10)
    losses = []
    random.seed(0)
    for b in range(3):
        alone = net(h[b][mask[b]], label=label[b:b + 1], **kw)
        losses.append(alone["loss"])
        torch.testing.assert_close(out["logits"][b:b + 1], alone["logits"], **close)
        att = out["attention"][b:b + 1]
        if slots:
            torch.testing.assert_close(att, alone["attention"], **close)
        else:  # over patches: zero on padding
            torch.testing.assert_close(att[..., mask[b]], alone["attention"], **close)
            assert (att[..., ~mask[b]] == 0).all()
        if out["moe_weights"] is not None:
            torch.testing.assert_close(out["moe_weights"][b:b + 1, mask[b]], alone["moe_weights"], **close)
        for key in AUX_LOSSES.get(model, ()):
            assert key in alone
    torch.testing.assert_close(out["loss"], torch.stack(losses).mean(), **close)


def test_nystrom_with_a_landmark_per_token_is_softmax_attention():
    """With m >= L landmarks (lucidrains' front padding to m tokens, one token
    per landmark) and a converged pinv, the Nystrom form equals exact attention
    over the sequence front-padded with m - L zero tokens (keys of logit 0,
    values 0), per bag, batch padding excluded."""
    torch.manual_seed(0)
    att = NystromAttention(8, dim_head=4, heads=2, num_landmarks=16, pinv_iterations=30, dropout=0.0).double().eval()
    nn.init.zeros_(att.res_conv.weight)
    x = 2 * torch.randn(3, 16, 8, dtype=torch.float64)
    lengths = [16, 10, 7]
    out, first_row = att(x, torch.tensor(lengths), return_first_row=True)
    for b, n in enumerate(lengths):
        q, k, v = rearrange(att.to_qkv(x[b, :n]), "l (three h d) -> three h l d", three=3, h=2)
        logits = torch.cat([q @ k.transpose(-1, -2) * att.scale, torch.zeros(2, n, 16 - n, dtype=x.dtype)], -1)
        a = logits.softmax(dim=-1)[..., :n]  # (H, n, n): the zero keys' share left out, their values are 0
        expected = att.to_out(rearrange(a @ v, "h l d -> l (h d)"))
        torch.testing.assert_close(out[b, :n], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(first_row[b, :, :n], a[:, 0], rtol=1e-10, atol=1e-10)
        assert (out[b, n:] == 0).all() and (first_row[b, :, n:] == 0).all()


def test_configs_ship_as_package_data_with_millabs_keys():
    root = files("mammoth_fast.mil") / "configs"
    for model in MODELS:
        configs = json.loads((root / f"{model}.json").read_text(encoding="utf-8"))
        assert set(configs) == set(CONFIGS[model]) and {"base", "base_mammoth"} <= set(configs)
        assert configs["base"]["moe_args"] == {}
        assert configs["base_mammoth"]["moe_args"]["num_experts"] == 30
        assert configs["base_mammoth"]["moe_args"]["keep_slots"] is True
    assert set(CONFIGS["clam"]) == {"base", "base_mammoth", "base_ce", "base_ce_subtyping", "base_subtyping"}
    assert set(CONFIGS["dftd"]) == {"base", "base_mammoth", "base_afs"}


def test_create_model_parses_every_name():
    names = model_names()
    assert len(names) == sum(len(c) for c in CONFIGS.values()) * len(ENCODER_DIMS)
    for name in names:
        model, config, encoder = name.split(".")
        if encoder not in ("uni", "conch_v1", "virchow2"):
            continue  # every encoder only sets in_dim: three cover the widths
        net = create_model(name, num_classes=4)
        assert isinstance(net, MODELS[model]) and net.in_dim == ENCODER_DIMS[encoder]
        assert isinstance(net.patch_embed, Mammoth) == (config == "base_mammoth")
        assert net.num_classes == 4
    abmil = create_model("abmil", 2)  # defaults: base, uni
    assert abmil.in_dim == 1024 and not isinstance(abmil.patch_embed, Mammoth)
    assert create_model("abmil.base_mammoth", 2).patch_embed.input_dim == 1024
    assert create_model("abmil.base_mammoth.uni.none", 2).patch_embed.input_dim == 1024  # MIL-Lab's four parts
    assert create_model("abmil.base.hoptimus", 2).in_dim == 1536  # MIL-Lab's name for H-optimus-0
    net = create_model("transmil.base_mammoth.conch_v15", 2, embed_dim=384, moe_args={"num_experts": 4, "backend": "eager"})
    assert net.patch_embed.num_experts == 4 and net.patch_embed.dim == 384 and net.patch_embed.backend == "eager"
    assert net.patch_embed.input_dim == 768


@pytest.mark.parametrize("name", ["abmil.large", "vit.base.uni", "abmil.base.uni3", "abmil.base_afs", "abmil.",
                                  "abmil.base.uni.none.x"])
def test_unknown_name_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match="transmil.*base_mammoth.*virchow2"):
        create_model(name, 2)


def test_a_task_needs_its_checkpoint():
    with pytest.raises(ValueError, match="pc108-24k.*Hugging Face hub.*checkpoint_path"):
        create_model("abmil.base.uni.pc108-24k", 2)


def test_unknown_override_and_contradicting_moe_args():
    with pytest.raises(ValueError, match="unknown override"):
        create_model("abmil", 2, attention_dim=8)
    with pytest.raises(ValueError, match="input_dim"):
        create_model("abmil.base_mammoth.uni", 2, moe_args={"num_experts": 30, "input_dim": 768})
    net = create_model("abmil.base_mammoth.conch_v15", 2, moe_args={"num_experts": 30, "input_dim": 768, "dim": 512})
    assert net.patch_embed.input_dim == 768


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model."])
def test_checkpoint_path_loads_prefixed_state_dicts(tmp_path, prefix):
    torch.manual_seed(0)
    src = create_model("abmil.base_mammoth.conch_v1", 2)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in src.state_dict().items()}}, path)
    torch.manual_seed(1)
    net = create_model("abmil.base_mammoth.conch_v1", 2, checkpoint_path=str(path))
    for (k, a), b in zip(src.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_failed_load_lists_what_is_wrong_and_renames_nothing(tmp_path):
    torch.manual_seed(0)
    src = create_model("meanmil.base_mammoth", 2)
    state = {k.replace("patch_embed.", "fc.mammoth."): v for k, v in src.state_dict().items()}
    state["classifier.weight"] = torch.randn(3, 512)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError) as err:  # a Mammoth under another name is not guessed
        create_model("meanmil.base_mammoth", 2, checkpoint_path=str(tmp_path / "ckpt.pt"))
    text = str(err.value)
    assert "ckpt.pt" in text and "missing (" in text and "patch_embed.slot_embeds" in text
    assert "unexpected (" in text and "fc.mammoth.slot_embeds" in text
    assert "shape mismatch (1): classifier.weight: checkpoint (3, 512) vs model (2, 512)" in text
    torch.save(create_model("meanmil.base", 2).state_dict(), tmp_path / "base.pt")
    with pytest.raises(ValueError, match="missing .*patch_embed.wq.weight"):  # a base checkpoint, a Mammoth model
        create_model("meanmil.base_mammoth", 2, checkpoint_path=str(tmp_path / "base.pt"))


def test_mammoth_replaces_the_linear_at_about_its_parameter_count():
    counts = parameter_counts("uni", num_classes=2)
    print("\n" + parameter_table("uni", num_classes=2))
    assert set(counts) == set(MODELS)
    for model in MODELS:
        base, moe = (create_model(f"{model}.{c}.uni", 2) for c in ("base", "base_mammoth"))
        linear = sum(p.numel() for p in base.patch_embed.parameters())
        mammoth = sum(p.numel() for p in moe.patch_embed.parameters())
        if model == "ilra":  # MIL-Lab's ILRA has no patch embedding (its first GAB takes in_dim): whole models
            linear, mammoth = (sum(p.numel() for p in net.parameters()) for net in (base, moe))
        if model == "dftd":  # MIL-Lab's Mammoth replaces DTFD's fc1 and its residual blocks: compare with fc1
            linear = sum(p.numel() for p in base.patch_embed.fc1.parameters())
        assert abs(mammoth / linear - 1) <= 0.25, (model, linear, mammoth)


def test_bad_input_raises():
    net = tiny_model("abmil", "base")
    with pytest.raises(ValueError, match="in_dim|24"):
        net(torch.randn(2, 5, IN_DIM + 1))
    with pytest.raises(ValueError, match="no unmasked"):
        net(torch.randn(2, 5, IN_DIM), mask=torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match="mask shape"):
        net(torch.randn(2, 5, IN_DIM), mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("variant", ["base", "eager-tokens", "triton"])
@pytest.mark.parametrize("model", list(MODELS))
def test_packed_bags_equal_one_bag_at_a_time(model, variant):
    """Bags packed along the rows with cu_seqlens (lengths 9, 5, 1: very unequal,
    one a single patch) give each bag's result alone; moe_weights come back packed."""
    net = tiny_model(model, variant, seed=2).double().eval()
    g = torch.Generator().manual_seed(3)
    bags = [torch.randn(n, IN_DIM, generator=g, dtype=torch.float64) for n in (M, 5, 1)]
    label = torch.tensor([2, 0, 1])
    offsets = torch.tensor([0, M, M + 5, M + 6], dtype=torch.int32)
    kw = dict(loss_fn=nn.CrossEntropyLoss(), return_moe_weights=True)
    random.seed(0)  # as in test_batched_masked_equals_one_bag_at_a_time (DTFD)
    out = net(torch.cat(bags), cu_seqlens=offsets, label=label, **kw)
    close = dict(rtol=1e-10, atol=1e-10)
    losses = []
    random.seed(0)
    for b, bag in enumerate(bags):
        alone = net(bag, label=label[b:b + 1], **kw)
        losses.append(alone["loss"])
        torch.testing.assert_close(out["logits"][b:b + 1], alone["logits"], **close)
        if out["moe_weights"] is not None:
            rows = slice(int(offsets[b]), int(offsets[b + 1]))
            torch.testing.assert_close(out["moe_weights"][rows], alone["moe_weights"][0], **close)
    torch.testing.assert_close(out["loss"], torch.stack(losses).mean(), **close)
    assert (out["moe_weights"] is None) == (VARIANTS[variant] is None)
    with pytest.raises(ValueError, match="either mask"):
        net(torch.cat(bags), cu_seqlens=offsets, mask=torch.ones(M + 6, dtype=torch.bool))
