"""TransMIL and its Nystrom attention against plain single-bag implementations
of what MIL-Lab computes (lucidrains' nystrom_attention 0.0.14 without a mask:
the sequence zero-padded at the front to a multiple of the landmarks, those rows
taking part; the square grid; PPEG), in float64. A padded batch must give each
bag's result alone.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mammoth_fast.mil import TransMIL
from mammoth_fast.mil.nystrom import NystromAttention, iterative_pinv

CLOSE = dict(rtol=1e-10, atol=1e-10)


def perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def nystrom_one(att, x):
    """x (L, dim), one sequence -> (out (L, dim), first token's row (H, L)), by
    the recipe: pad P = (-L) mod m zero rows in front, landmarks the means of m
    equal consecutive groups of the padded rows, three softmaxes, 6-step
    Newton pinv scaled over all heads, depthwise value conv, last L rows."""
    n, dim = x.shape
    m, h = att.num_landmarks, att.heads
    front = (-n) % m
    xp = torch.cat([x.new_zeros(front, dim), x])
    q, k, v = (xp @ att.to_qkv.weight.t()).chunk(3, dim=-1)
    q, k, v = (t.reshape(len(xp), h, -1).transpose(0, 1) for t in (q, k, v))  # (H, N, d)
    q = q * att.scale
    ql, kl = (t.reshape(h, m, len(xp) // m, -1).mean(dim=2) for t in (q, k))  # (H, m, d)
    a1 = (q @ kl.transpose(1, 2)).softmax(-1)
    a2 = (ql @ kl.transpose(1, 2)).softmax(-1)
    a3 = (ql @ k.transpose(1, 2)).softmax(-1)
    z = a2.transpose(1, 2) / (a2.abs().sum(-1).max() * a2.abs().sum(-2).max())
    eye = torch.eye(m, dtype=x.dtype)
    for _ in range(att.pinv_iterations):
        xz = a2 @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    out = a1 @ z @ (a3 @ v)  # (H, N, d)
    if att.residual:
        w = att.res_conv.weight[:, :, :, 0]  # (H, 1, K)
        conv = F.conv1d(v.permute(2, 0, 1), w, padding=w.shape[-1] // 2, groups=h)  # (d, H, N)
        out = out + conv.permute(1, 2, 0)
    out = out.transpose(0, 1).reshape(len(xp), -1) @ att.to_out[0].weight.t() + att.to_out[0].bias
    return out[front:], (a1 @ z @ a3)[:, front, front:]


@pytest.mark.parametrize("dim,dim_head,heads,m,residual", [(16, 4, 4, 8, True), (12, 5, 3, 4, True),
                                                             (16, 8, 2, 8, False)])
def test_nystrom_batch_equals_the_front_padded_recipe_per_sequence(dim, dim_head, heads, m, residual):
    torch.manual_seed(0)
    att = perturb(NystromAttention(dim, dim_head=dim_head, heads=heads, num_landmarks=m, residual=residual,
                                   dropout=0.1)).double().eval()
    lengths = [1, 2, m - 1, m, m + 1, 3 * m + 2, 50]  # l = 1 .. 7 rows per landmark, P = 0 .. m - 1
    x = torch.randn(len(lengths), 53, dim, dtype=torch.float64)
    x[:, 50:] = float("nan")  # padding content takes no part
    out, row = att(x, torch.tensor(lengths), return_first_row=True)
    for b, n in enumerate(lengths):
        ref_out, ref_row = nystrom_one(att, x[b, :n])
        torch.testing.assert_close(out[b, :n], ref_out, **CLOSE)
        torch.testing.assert_close(row[b, :, :n], ref_row, **CLOSE)
        assert (out[b, n:] == 0).all() and (row[b, :, n:] == 0).all()
        torch.testing.assert_close(att(x[b:b + 1, :n])[0], ref_out, **CLOSE)  # lengths None: all real


def test_iterative_pinv_scales_each_sequence_over_its_heads():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 5, 5, dtype=torch.float64).softmax(-1)
    a[1] *= 7  # another scale: a batch-wide maximum would change sequence 0's start
    z = iterative_pinv(a, 6)
    for b in range(2):
        torch.testing.assert_close(z[b], iterative_pinv(a[b:b + 1], 6)[0], **CLOSE)
    converged = iterative_pinv(a, 40)
    torch.testing.assert_close(converged, torch.linalg.pinv(a), rtol=1e-8, atol=1e-8)
    flat = iterative_pinv(a[:, 0], 6)  # (B, m, m): one matrix per sequence
    for b in range(2):
        torch.testing.assert_close(flat[b], iterative_pinv(a[b:b + 1, :1], 6)[0, 0], **CLOSE)


def transmil_one(net, x):
    """x (n, D) one bag's tokens -> (logits (C,), attention (n,)), by MIL-Lab's recipe."""
    n, d = x.shape
    s = math.ceil(math.sqrt(n))
    seq = torch.cat([net.cls_token[0], x, x[:s * s - n]])  # (1 + s*s, D)
    att = None
    for i, blk in enumerate(net.blocks):
        seq = seq + nystrom_one(blk.attention, F.layer_norm(seq, (d,), blk.norm.weight, blk.norm.bias))[0]
        if i == 0:
            att = seq[1:n + 1] @ seq[0]
            grid = seq[1:].t().reshape(1, d, s, s)
            pos = net.pos_layer
            conv = [F.conv2d(grid, c.weight, c.bias, padding=c.kernel_size[0] // 2, groups=d)
                    for c in (pos.proj, pos.proj1, pos.proj2)]
            grid = conv[0] + grid + conv[1] + conv[2]
            seq = torch.cat([seq[:1], grid.reshape(d, s * s).t()])
    cls = F.layer_norm(seq[0], (d,), net.norm.weight, net.norm.bias)
    return cls @ net.classifier.weight.t() + net.classifier.bias, att


def test_transmil_masked_batch_equals_millab_per_bag():
    """Bags of 23, 11, 8 (holes) and 1 tokens: grid sides 5, 4, 3, 1 and Nystrom
    sequences of 26, 17, 10, 2 with 8 landmarks (P = 6, 7, 6, 6)."""
    torch.manual_seed(0)
    net = perturb(TransMIL(in_dim=8, num_classes=3, embed_dim=16, num_heads=4)).double().eval()
    x = torch.randn(4, 23, 16, dtype=torch.float64)
    mask = torch.zeros(4, 23, dtype=torch.bool)
    mask[0], mask[1, :11], mask[2, ::3], mask[3, 5] = True, True, True, True
    x[~mask] = 1e3
    x.requires_grad_(True)
    out = net.aggregate(x, mask, None, True)
    for b in range(4):
        logits, att = transmil_one(net, x[b][mask[b]])
        torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
        torch.testing.assert_close(out["attention"][b][mask[b]], att, **CLOSE)
        assert (out["attention"][b][~mask[b]] == 0).all()
    (out["logits"].sum() + out["attention"].sum()).backward()
    assert (x.grad[~mask] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("n", [1, 2, 4, 5, 17])
def test_transmil_unmasked_bag_equals_millab(n):
    torch.manual_seed(1)
    net = perturb(TransMIL(in_dim=8, num_classes=2, embed_dim=16, num_heads=2, num_attention_layers=3),
                  seed=1).double().eval()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    out = net.aggregate(x, None, None, True)
    for b in range(2):
        logits, att = transmil_one(net, x[b])
        torch.testing.assert_close(out["logits"][b], logits, **CLOSE)
        torch.testing.assert_close(out["attention"][b], att, **CLOSE)


def test_transmil_layers_are_millab_s():
    net = TransMIL(in_dim=8, num_classes=2, embed_dim=24, num_heads=4)
    att = net.blocks[0].attention
    assert (att.heads, att.num_landmarks, att.pinv_iterations, att.scale) == (4, 12, 6, 6 ** -0.5)
    assert att.res_conv.kernel_size == (33, 1) and att.to_out[1].p == 0.1
    assert [c.kernel_size for c in (net.pos_layer.proj, net.pos_layer.proj1, net.pos_layer.proj2)] == \
        [(7, 7), (5, 5), (3, 3)]
