"""DSMIL against an independent, per-bag, per-class computation: MIL-Lab's math
(the default) and the original repository's (config "original")."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mammoth_fast.mil import create_model

IN_DIM, D, A, C = 12, 10, 6, 4


def tiny(config: str, seed: int = 0, num_classes: int = C):
    torch.manual_seed(seed)
    net = create_model(f"dsmil.{config}", num_classes, in_dim=IN_DIM, embed_dim=D, attn_dim=A).double().eval()
    with torch.no_grad():  # LayerNorm and biases away from their init, so that they count
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@torch.no_grad()
def reference(net, h: torch.Tensor, original: bool):
    """One bag h (M, in_dim) -> logits (C,), bag logits, max logits, attention (C, M)."""
    lin = net.patch_embed[0]
    x = torch.relu(h @ lin.weight.T + lin.bias)  # (M, D)
    w = net.i_classifier.inst_classifier
    scores = x @ w.weight.T + w.bias  # (M, C)
    bc = net.b_classifier
    if original:
        q = lambda t: torch.tanh(bc.q[2](torch.relu(bc.q[0](t))))  # noqa: E731
        values = x
    else:
        q = bc.q
        values = x @ bc.v[1].weight.T + bc.v[1].bias
    scale = float(np.sqrt(np.float32(A)))  # sqrt in float32, as theirs
    bag_logits, max_logits, attention = [], [], []
    for c in range(net.num_classes):
        crit = int(np.argmax(scores[:, c].numpy()))
        max_logits.append(scores[crit, c])
        a = torch.softmax(q(x) @ q(x[crit]) / scale, dim=0)  # (M,)
        attention.append(a)
        emb = a @ values  # (D,)
        if not original:
            emb = F.layer_norm(emb, (D,), bc.norm.weight, bc.norm.bias, bc.norm.eps)
        bag_logits.append(emb)
    emb = torch.stack(bag_logits)  # (C, D)
    bag = torch.einsum("ocd,cd->o", net.classifier.weight, emb) + net.classifier.bias
    mx = torch.stack(max_logits)
    return 0.5 * (bag + mx), bag, mx, torch.stack(attention)


@pytest.mark.parametrize("config", ["base", "original"])
def test_matches_an_independent_computation_in_a_padded_batch(config):
    net = tiny(config)
    original = config == "original"
    lengths = [7, 3, 5]
    h = torch.randn(3, 7, IN_DIM, dtype=torch.float64)
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]
    h[~mask] = 1e3  # junk padding: neither its tokens nor its scores may count
    label = torch.tensor([0, 3, 1])
    out = net(h, mask=mask, label=label, loss_fn=nn.CrossEntropyLoss(), return_attention=True)
    close = dict(rtol=1e-12, atol=1e-12)
    assert out["attention"].shape == (3, C, 7)
    logits = []
    for b, n in enumerate(lengths):
        ref, bag, mx, att = reference(net, h[b, :n], original)
        logits.append(ref)
        torch.testing.assert_close(out["logits"][b], ref, **close)
        torch.testing.assert_close(out["bag_logits"][b], bag, **close)
        torch.testing.assert_close(out["max_logits"][b], mx, **close)
        torch.testing.assert_close(out["attention"][b, :, :n], att, **close)
        assert (out["attention"][b, :, n:] == 0).all()
    logits = torch.stack(logits)
    if original:
        bag_loss = F.cross_entropy(out["bag_logits"], label)
        max_loss = F.cross_entropy(out["max_logits"], label)
        torch.testing.assert_close(out["bag_loss"], bag_loss, **close)
        torch.testing.assert_close(out["max_loss"], max_loss, **close)
        torch.testing.assert_close(out["loss"], 0.5 * (bag_loss + max_loss), **close)
    else:  # MIL-Lab: one loss, on the averaged logits
        assert "bag_loss" not in out and "max_loss" not in out
        torch.testing.assert_close(out["loss"], F.cross_entropy(logits, label), **close)


def test_millab_modules_and_their_unused_fcc():
    """MIL-Lab's module names; b_classifier.fcc is Conv1d(3, 3, D) whatever the
    class count, held for their checkpoints and never used (no gradient)."""
    net = tiny("base", num_classes=5).train()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("patch_embed")}
    assert shapes == {
        "i_classifier.inst_classifier.weight": (5, D), "i_classifier.inst_classifier.bias": (5,),
        "b_classifier.q.weight": (A, D), "b_classifier.q.bias": (A,),
        "b_classifier.v.1.weight": (D, D), "b_classifier.v.1.bias": (D,),
        "b_classifier.norm.weight": (D,), "b_classifier.norm.bias": (D,),
        "b_classifier.fcc.weight": (3, 3, D), "b_classifier.fcc.bias": (3,),
        "classifier.weight": (5, 5, D), "classifier.bias": (5,),
    }
    out = net(torch.randn(2, 6, IN_DIM, dtype=torch.float64), label=torch.tensor([4, 0]),
              loss_fn=nn.CrossEntropyLoss())
    out["loss"].backward()
    assert net.b_classifier.fcc.weight.grad is None
    assert all(p.grad is not None for n, p in net.named_parameters() if "fcc" not in n)


def test_original_config_has_the_original_modules_and_trains():
    net = tiny("original").train()
    assert net.original and not hasattr(net.b_classifier, "fcc")
    assert isinstance(net.b_classifier.v, nn.Identity) and isinstance(net.b_classifier.norm, nn.Identity)
    assert net.b_classifier.q[2].out_features == A
    out = net(torch.randn(2, 6, IN_DIM, dtype=torch.float64), label=torch.tensor([1, 2]),
              loss_fn=nn.CrossEntropyLoss())
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
