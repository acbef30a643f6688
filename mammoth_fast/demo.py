"""A short demo of the layer: drop Mammoth into a mean-pooling MIL model, train
one step on a random bag, and time the layer against the nn.Linear it replaces.

    python -m mammoth_fast.demo [--n 10000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from . import Mammoth


class MeanMIL(nn.Module):
    """Patch embedding (Linear + ReLU, or Mammoth), mean pooling, linear classifier."""

    def __init__(self, in_dim: int, dim: int, num_classes: int, moe_args: dict | None = None) -> None:
        super().__init__()
        if moe_args and moe_args.get("num_experts", 0) > 0:
            self.patch_embed = Mammoth(in_dim, dim, **moe_args)
        else:
            self.patch_embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.patch_embed(x).mean(dim=1))


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time in ms of forward + backward (CPU)."""
    times = []
    for _ in range(repeats + 1):
        x.grad = None
        t0 = time.perf_counter()
        layer(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="patches in the bag")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    in_dim, dim = 1024, 512
    x = torch.randn(1, args.n, in_dim)
    label = torch.tensor([1])

    model = MeanMIL(in_dim, dim, num_classes=3, moe_args={"num_experts": 30, "keep_slots": True})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = nn.functional.cross_entropy(model(x), label)
    loss.backward()
    opt.step()
    print(f"MeanMIL with Mammoth ({model.patch_embed.extra_repr()})")
    print(f"one training step on a bag of {args.n} patches: loss {loss.item():.4f}")

    xg = x.clone().requires_grad_()
    rows = [("nn.Linear(1024, 512)", nn.Linear(in_dim, dim)),
            ("Mammoth eager (mammoth_fast)", Mammoth(in_dim, dim, backend="eager"))]
    try:
        import mammoth

        rows.append(("Mammoth (mammoth-moe 0.1.2)", mammoth.Mammoth(in_dim, dim)))
    except ImportError:
        pass
    print(f"\nforward+backward, N = {args.n}, fp32, {torch.get_num_threads()} CPU threads, median of {args.repeats}:")
    base = None
    for name, layer in rows:
        ms = time_fwd_bwd(layer, xg, args.repeats)
        base = base or ms
        print(f"  {name:32s} {ms:9.1f} ms  {ms / base:6.1f}x nn.Linear")


if __name__ == "__main__":
    main()
