"""RRT-MIL: MIL-Lab's (a Nystrom transformer with attention pooling) and our
``original`` variant (the paper's R-MSA / CR-MSA).

MIL-Lab's checkpoints against their outputs: tests/test_millab_fidelity.py.
Here the model against a plain single-bag computation of what their code does
(lucidrains' Nystrom attention with its front zero padding written out, their
patch merging with view and slices), at bag sizes below and above the
landmarks, alone and in masked batches; what their code ignores; and the
original variant's regions.
"""
import math

import pytest
import torch
import torch.nn as nn
from einops import rearrange

from mammoth_fast.mil import RRTMIL, create_model
from mammoth_fast.mil.rrt import region_layout
from test_mil import IN_DIM, NUM_CLASSES, padded_batch
from test_mil_part2 import mixed_mask, plain_attention

CLOSE = dict(rtol=1e-10, atol=1e-10)
SMALL = dict(in_dim=8, num_classes=3, embed_dim=16, mlp_dim=16, n_heads=2, trans_dim=8)


def small(seed=0, **kw):
    torch.manual_seed(seed)
    return RRTMIL(**{**SMALL, **kw}).double().eval()


def tokens(bsz, t, d=16, seed=0):
    torch.manual_seed(seed)
    return torch.randn(bsz, t, d, dtype=torch.float64)


# ---------------------------------------------------------------- MIL-Lab's computation, one bag, written out

def lucidrains_nystrom(attn, x):
    """lucidrains' NystromAttention (0.0.14) without a mask on one sequence x (n, dim)."""
    n, m, h = x.shape[0], attn.num_landmarks, attn.heads
    pad = (m - n % m) % m
    x = torch.cat([x.new_zeros(pad, x.shape[1]), x])  # zero rows in FRONT
    q, k, v = (rearrange(t, "n (h d) -> h n d", h=h) for t in attn.to_qkv(x).chunk(3, dim=-1))
    q = q * attn.scale
    group = math.ceil(n / m)
    q_land, k_land = (t.reshape(h, m, group, -1).sum(dim=2) / group for t in (q, k))
    a1, a2, a3 = ((s @ t.transpose(-1, -2)).softmax(dim=-1) for s, t in ((q, k_land), (q_land, k_land), (q_land, k)))
    ab = a2.abs()
    z = a2.transpose(-1, -2) / (ab.sum(dim=-1).max() * ab.sum(dim=-2).max())  # maxima over all heads
    eye = torch.eye(m, dtype=x.dtype)
    for _ in range(6):
        xz = a2 @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    out = (a1 @ z) @ (a3 @ v) + attn.res_conv(v[None])[0]
    return attn.to_out(rearrange(out, "h n d -> n (h d)"))[-n:]


def their_patch_merging(merge, x):
    """MIL-Lab's PatchMerging on one bag x (L, C)."""
    length, c = x.shape
    side = math.ceil(math.sqrt(length))
    side += side % 2
    grid = torch.cat([x, x.new_zeros(side * side - length, c)]).view(side, side, c)
    x = torch.cat([grid[0::2, 0::2], grid[1::2, 0::2], grid[0::2, 1::2], grid[1::2, 1::2]], dim=-1)
    return merge.reduction(merge.norm(x.reshape(-1, 4 * c)))


def their_forward(net, h):
    """MIL-Lab's RRTMIL.forward (eval) on one bag h (n, in_dim) -> logits (C,), attention (n',)."""
    x = net.patch_embed(h)
    enc = net.encoder
    for layer in (enc.layer1, *enc.layers):
        for _ in range(layer.n_cycle):
            x = x + lucidrains_nystrom(layer.attn, layer.norm(x))
            if layer.mlp is not None:
                x = x + layer.mlp(layer.norm2(x))
            if layer.downsample is not None:
                x = their_patch_merging(layer.downsample, x)
    x = enc.norm(x)
    a = enc.pool_fn.attention(x).squeeze(-1).softmax(dim=0)
    return net.classifier(a @ x), a


CONFIGS = {
    "base": {},
    "ffn_cycles_gated": dict(ffn=True, ffn_act="relu", mlp_ratio=2.0, n_cycle=2, n_layers=3, da_gated=True,
                             da_bias=True, da_act="gelu"),
    "multi_scale": dict(multi_scale=True, n_layers=3, act="gelu", da_act="tanh"),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_batched_bags_below_and_above_the_landmarks_give_their_computation(config):
    """With 16 landmarks (MIL-Lab's 256 are covered by the golden fixtures): bags
    of 19 (two rows per landmark, 13 front zero rows), 17 with holes, 16 (no
    padding) and 3 (one row per landmark) in one masked batch (and alone, base):
    MIL-Lab's forward for each bag alone."""
    net = small(num_landmarks=16, **CONFIGS[config])
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 20, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    mask[0, :19] = True
    mask[1, torch.randperm(20, generator=g)[:17]] = True
    mask[2, 2:18] = True
    mask[3, ::7] = True
    with torch.no_grad():
        out = net(h, mask=mask, return_attention=True)
        for b in range(4):
            logits, a = their_forward(net, h[b][mask[b]])
            torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
            if config == "multi_scale":  # over the merged tokens
                torch.testing.assert_close(out["attention"][b, :len(a)], a, **CLOSE)
                assert (out["attention"][b, len(a):] == 0).all()
            else:
                torch.testing.assert_close(out["attention"][b, mask[b]], a, **CLOSE)
                assert (out["attention"][b, ~mask[b]] == 0).all()
            if config == "base":
                torch.testing.assert_close(net(h[b][mask[b]])["logits"][0], logits, **CLOSE)


def test_a_single_patch_and_a_tiny_bag():
    net = small(multi_scale=True)
    with torch.no_grad():
        for n in (1, 2, 5):
            h = tokens(1, n, 8)[0]
            torch.testing.assert_close(net(h)["logits"][0], their_forward(net, h)[0], **CLOSE)


def test_what_their_code_ignores_changes_nothing():
    """attn, region keys, trans_dropout, pos_pos and no_norm are never used by MIL-Lab:
    the same parameters and outputs; with dropout 0 the layers have no dropout in
    training (trans_dropout is not theirs)."""
    ignored = dict(attn="rrt", region_num=3, epeg=True, min_region_num=5, shift_size=True, qkv_bias=False,
                   trans_dropout=0.9, pos_pos=1, no_norm=True)
    base, other = small(seed=3, dropout=0.0), small(seed=3, dropout=0.0, **ignored)
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in other.state_dict().items()}
    h = tokens(1, 40, 8)[0]
    with torch.no_grad():
        ref = base(h)["logits"]
        torch.testing.assert_close(other(h)["logits"], ref, **CLOSE)
        torch.testing.assert_close(other.train()(h)["logits"], ref, **CLOSE)


@pytest.mark.parametrize("pos,keys", [("ppeg", {"proj", "proj1", "proj2"}), ("peg", {"proj"}), ("none", set()),
                                      ("sincos", set())])
def test_the_position_encoding_holds_their_parameters_and_is_never_applied(pos, keys):
    net = small(pos=pos, peg_k=5)
    names = {k.split(".")[2] for k in net.state_dict() if k.startswith("encoder.pos_embedding.")}
    assert names == keys
    if keys:
        assert net.encoder.pos_embedding.proj.weight.shape == (16, 1, 5, 5)
        h = tokens(1, 30, 8)[0]
        with torch.no_grad():
            before = net(h)["logits"]
            for p in net.encoder.pos_embedding.parameters():
                p.add_(1.0)
            torch.testing.assert_close(net(h)["logits"], before, rtol=0, atol=0)


def test_drop_path_drops_whole_residual_branches_in_training():
    """drop_path 1: every layer's attention branch is dropped, so the model is
    LN -> pooling -> classifier on the embedded patches."""
    net = small(drop_path=1.0, dropout=0.0).train()
    h = tokens(1, 20, 8)[0]
    x = net.encoder.norm(net.patch_embed(h))
    a = net.encoder.pool_fn.attention(x).squeeze(-1).softmax(dim=0)
    torch.testing.assert_close(net(h)["logits"][0], net.classifier(a @ x), **CLOSE)
    net.eval()
    torch.testing.assert_close(net(h)["logits"][0], their_forward(net, h)[0], **CLOSE)


def test_mean_pooling_where_their_forward_crashes():
    net = small(pool="mean")
    assert net.encoder.pool_fn is None
    h, mask = tokens(2, 9, 8), torch.tensor([[1] * 9, [1] * 4 + [0] * 5], dtype=torch.bool)
    with torch.no_grad():
        out = net(h, mask=mask, return_attention=True)
        torch.testing.assert_close(out["attention"].sum(dim=1), torch.ones(2, dtype=torch.float64), **CLOSE)
        assert (out["attention"][1, 4:] == 0).all()
        torch.testing.assert_close(out["logits"][1], net(h[1, :4])["logits"][0], **CLOSE)


@pytest.mark.parametrize("kw,match", [(dict(embed_dim=32), "mlp_dim"), (dict(multi_scale=True, n_layers=1), "n_layers"),
                                      (dict(multi_scale=True, n_cycle=2), "n_cycle")])
def test_settings_their_code_cannot_run_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        RRTMIL(**{**SMALL, **kw})


def test_constructor_takes_every_millab_key():
    from mammoth_fast.mil.millab import RRTMILConfig, RRTMILModel
    net = RRTMILModel(RRTMILConfig(in_dim=8, embed_dim=16, mlp_dim=16, n_heads=2, trans_dim=8, num_classes=3))
    assert isinstance(net.model, RRTMIL)
    assert net.model.encoder.layer1.attn.to_qkv.weight.shape == (3 * 2 * 8, 16)  # heads * trans_dim
    assert len(net.model.encoder.layers) == 1 and net.model.classifier.in_features == 16


# ---------------------------------------------------------------- original=True: R-MSA / CR-MSA


def original(seed=0, **kw):
    return small(seed, original=True, pos="none", n_layers=1, epeg=True, **kw)


@pytest.mark.parametrize("t", [1, 2, 6, 9, 63, 64, 65, 300])
def test_region_layout_places_each_real_token_once_row_major(t):
    for mask in (torch.ones(1, t, dtype=torch.bool), mixed_mask(t)):
        index, valid, pos = region_layout(mask, 8)
        for b in range(len(mask)):
            real = mask[b].nonzero().squeeze(1)
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
        assert region_layout(torch.ones(1, t, dtype=torch.bool), 8)[0].shape == (1, 64, 9)


def test_rmsa_and_crmsa_on_a_full_grid_equal_the_originals_region_partition():
    """A bag that fills its grid (16 tokens, 2 x 2 regions of 2 x 2): the R-MSA
    layer (EPEG) and the CR-MSA layer as the paper's code computes them with
    view/permute."""
    net = original(region_num=2)
    x, n = tokens(1, 16)[0], torch.tensor([16])

    def partition(z):  # (16, D) -> (4 regions, 4 cells, D), the original's region_partition
        return z.view(1, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(4, 4, -1)

    def reverse(z):
        return z.view(1, 2, 2, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(16, -1)

    rmsa = net.encoder.layer1
    assert rmsa.attn.pe is not None and not net.encoder.layers
    o = plain_attention(partition(rmsa.norm(x)), rmsa.attn.qkv, 2, rmsa.attn.scale, rmsa.attn.proj, pe=rmsa.attn.pe)[0]
    expected = x + reverse(o)
    torch.testing.assert_close(rmsa(x[None], n)[0][0], expected, **CLOSE)

    layer = net.encoder.cr_msa
    cr = layer.attn
    y = partition(layer.norm(expected))
    logits = torch.einsum("wpc,ck->wkp", y, cr.phi)
    lo, hi = logits.min(dim=-1, keepdim=True).values, logits.max(dim=-1, keepdim=True).values
    reps = torch.einsum("wpc,wkp->kwc", y, logits.softmax(dim=-1))  # (k, regions, D)
    mixed = plain_attention(reps, cr.attn.qkv, 2, cr.attn.scale, cr.attn.proj)[0]
    back = torch.einsum("kwc,wkp->wpc", mixed, (logits - lo) / (hi - lo + 1e-8) * logits.softmax(dim=1))
    torch.testing.assert_close(layer(expected[None], n)[0][0], expected + reverse(back), **CLOSE)


def test_one_region_is_self_attention_over_the_real_tokens():
    """region_num = 1 and no EPEG: R-MSA is multi-head attention over each bag's tokens."""
    net = small(original=True, region_num=1, n_layers=1)
    attn = net.encoder.layer1.attn
    assert attn.pe is None
    x, lengths = tokens(3, 7), torch.tensor([7, 3, 5])
    got = attn(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[b, :n], plain_attention(x[b, :n][None], attn.qkv, 2, attn.scale, attn.proj)[0][0],
                                   **CLOSE)
        assert (got[b, n:] == 0).all()


def test_original_config_masked_and_packed_batches_equal_each_bag_alone_and_train():
    torch.manual_seed(0)
    net = create_model("rrt.original", NUM_CLASSES, in_dim=IN_DIM, embed_dim=32, mlp_dim=32, n_heads=2,
                       region_num=2).double().eval()
    assert net.encoder.cr_msa is not None and net.encoder.pos_embedding is None
    h, mask, label = padded_batch(torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    out = net(h, mask=mask, label=label, loss_fn=loss_fn, return_attention=True)
    bags = [h[b][mask[b]] for b in range(3)]
    offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
    packed = net(torch.cat(bags), cu_seqlens=offsets, label=label, loss_fn=loss_fn)
    for b, bag in enumerate(bags):
        alone = net(bag, return_attention=True)
        torch.testing.assert_close(out["logits"][b:b + 1], alone["logits"], **CLOSE)
        torch.testing.assert_close(packed["logits"][b:b + 1], alone["logits"], **CLOSE)
        torch.testing.assert_close(out["attention"][b:b + 1, mask[b]], alone["attention"], **CLOSE)
    torch.testing.assert_close(packed["loss"], out["loss"], **CLOSE)

    net.train()
    out = net(h, mask=mask, label=label, loss_fn=loss_fn)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
