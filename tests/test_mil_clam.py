"""CLAM-SB's instance loss and its smooth top-1 SVM, against independent loop-based
computations written from MIL-Lab's CLAMSB and oval-group/smooth-topk's
SmoothTop1SVM (the fixtures in test_millab_fidelity.py check their outputs; these
cover what two bags cannot: bags smaller than k_sample or 2 * k_sample, the
SVM's hard rows, gradients, batches with padding)."""
import math

import pytest
import torch
import torch.nn as nn

from mammoth_fast.mil import create_model
from mammoth_fast.mil.clam import CLAMSB, SmoothTop1SVM

IN_DIM, NUM_CLASSES, K = 12, 3, 3


def svm_rows(x, y, alpha=1.0, tau=1.0):
    """smooth-topk's smooth top-1 SVM per row, from its formula, in python floats."""
    out = []
    for row, t in zip(x.tolist(), y.tolist()):
        s = [v + (alpha if j != t else 0.0) - row[t] for j, v in enumerate(row)]
        first, second = sorted(row, reverse=True)[:2]
        if first - second >= tau * math.log(1000.0):  # smooth-topk switches to the hard max there
            out.append(max(s))
        else:
            out.append(tau * math.log(sum(math.exp(v / tau) for v in s)))
    return out


def ce_rows(x, y):
    return [math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(x.tolist(), y.tolist())]


def svm_grad(x, y, alpha=1.0, tau=1.0):
    """d(sum of svm_rows)/dx: softmax(s / tau) - onehot(y) on smooth rows, onehot(argmax s) - onehot(y) on hard ones."""
    g = torch.zeros_like(x)
    for i, (row, t) in enumerate(zip(x.tolist(), y.tolist())):
        s = [v + (alpha if j != t else 0.0) - row[t] for j, v in enumerate(row)]
        first, second = sorted(row, reverse=True)[:2]
        if first - second >= tau * math.log(1000.0):
            g[i, max(range(len(s)), key=s.__getitem__)] += 1.0
        else:
            z = sum(math.exp(v / tau) for v in s)
            for j, v in enumerate(s):
                g[i, j] += math.exp(v / tau) / z
        g[i, t] -= 1.0
    return g


@pytest.mark.parametrize("n_classes,alpha,tau", [(2, 1.0, 1.0), (3, 1.0, 1.0), (2, 2.0, 0.5)])
@pytest.mark.parametrize("scale", [1.0, 5.0, 40.0])
def test_smooth_top1_svm_is_the_formula(n_classes, alpha, tau, scale):
    g = torch.Generator().manual_seed(int(scale) + n_classes)
    x = scale * torch.randn(64, n_classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (64,), generator=g)
    rows = torch.tensor(svm_rows(x, y, alpha, tau), dtype=torch.float64)
    svm = SmoothTop1SVM(n_classes, alpha=alpha, tau=tau)
    torch.testing.assert_close(SmoothTop1SVM(n_classes, alpha, tau, reduction="none")(x, y), rows, rtol=0, atol=1e-12)
    torch.testing.assert_close(SmoothTop1SVM(n_classes, alpha, tau, reduction="sum")(x, y), rows.sum(),
                               rtol=1e-13, atol=1e-12)
    x.requires_grad_(True)
    loss = svm(x, y)  # smooth-topk's reduction: the sum over rows / N
    torch.testing.assert_close(loss, rows.mean(), rtol=1e-13, atol=1e-12)
    loss.backward()
    torch.testing.assert_close(x.grad, svm_grad(x.detach(), y, alpha, tau) / 64, rtol=0, atol=1e-14)


def test_smooth_top1_svm_state_dict_is_smooth_topks():
    """smooth-topk's loss holds labels = arange(n_classes) as a buffer, so MIL-Lab's CLAM
    checkpoints hold model.instance_loss_fn.labels for 'svm' and nothing for 'ce'."""
    state = SmoothTop1SVM(2).double().state_dict()
    assert list(state) == ["labels"] and torch.equal(state["labels"], torch.arange(2))
    keys = {cfg: [k for k in create_model(f"clam.{cfg}", 2).state_dict() if k.startswith("instance_loss_fn")]
            for cfg in ("base", "base_ce")}
    assert keys == {"base": ["instance_loss_fn.labels"], "base_ce": []}
    with pytest.raises(ValueError, match="instance_loss_fn"):
        create_model("clam.base", 2, instance_loss_fn="hinge")


def independent_bag_loss(net: CLAMSB, x, scores, label: int, rows_fn):
    """MIL-Lab's forward_instance_heads for one bag: x (n, D) its tokens, scores (n,) its
    attention scores before the softmax; k = min(k_sample, n) (MIL-Lab needs n >= k_sample)."""
    n = len(scores)
    k = min(net.k_sample, n)
    order = sorted(range(n), key=lambda i: scores[i].item())
    top, bottom = order[::-1][:k], order[:k]

    def mean_loss(idx, targets, clf):
        logits = x[idx] @ clf.weight.T + clf.bias
        return sum(rows_fn(logits, torch.tensor(targets))) / len(idx)

    total = 0.0
    for c, clf in enumerate(net.instance_classifiers):
        if c == label:
            total += mean_loss(top + bottom, [1] * k + [0] * k, clf)
        elif net.subtyping:
            total += mean_loss(top, [0] * k, clf)
    return total / NUM_CLASSES if net.subtyping else total


@pytest.mark.parametrize("classifier_scale", [1.0, 30.0], ids=["smooth", "with-hard-rows"])
@pytest.mark.parametrize("config", ["base", "base_ce", "base_subtyping", "base_ce_subtyping"])
def test_instance_loss_per_bag_in_a_padded_batch(config, classifier_scale):
    """Bags of 9 (>= 2k), 4 (k <= n < 2k: top and bottom overlap, as in MIL-Lab), 2 and 1
    (< k_sample, where MIL-Lab's topk raises: k = n) real tokens in one padded batch."""
    torch.manual_seed(0)
    net = create_model(f"clam.{config}", NUM_CLASSES, in_dim=IN_DIM, embed_dim=16, attention_dim=8,
                       k_sample=K).double().eval()
    with torch.no_grad():
        for clf in net.instance_classifiers:
            clf.weight.mul_(classifier_scale), clf.bias.normal_()
    sizes, label = [9, 4, 2, 1], torch.tensor([1, 0, 2, 1])
    mask = torch.arange(9) < torch.tensor(sizes)[:, None]  # (4, 9)
    h = torch.randn(4, 9, IN_DIM, dtype=torch.float64)
    h[~mask] = 1e3
    out = net(h, mask=mask, label=label, loss_fn=nn.CrossEntropyLoss())

    rows_fn = ce_rows if "ce" in config else svm_rows
    with torch.no_grad():
        x = net.patch_embed(h)
        scores = net.global_attn(x).squeeze(-1)
    per_bag = [independent_bag_loss(net, x[b, :n], scores[b, :n], int(label[b]), rows_fn) for b, n in enumerate(sizes)]
    instance_loss = sum(per_bag) / len(per_bag)
    cls_loss = nn.functional.cross_entropy(out["logits"], label)
    torch.testing.assert_close(out["instance_loss"].item(), instance_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["cls_loss"], cls_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["loss"].item(), 0.7 * cls_loss.item() + 0.3 * instance_loss, rtol=0, atol=1e-12)
    if classifier_scale > 1 and "ce" not in config:  # the SVM's hard switch was exercised
        logits = net.instance_classifiers[0](x[mask]).topk(2, dim=-1).values
        assert ((logits[:, 0] - logits[:, 1]) >= math.log(1000)).any()


def test_instance_loss_gives_padding_no_gradient_and_runs_in_eval_mode():
    """As in MIL-Lab, the instance loss comes whenever a label is given (eval mode too)."""
    torch.manual_seed(0)
    net = create_model("clam.base_subtyping", NUM_CLASSES, in_dim=IN_DIM, embed_dim=16, attention_dim=8,
                       k_sample=K).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 7, [True, True] + [False] * 5])
    out = net.aggregate(x, mask, torch.tensor([0, 2]), False)
    out["instance_loss"].backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()
    assert "instance_loss" not in net.aggregate(x, mask, None, False)
