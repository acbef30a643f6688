"""DistributedDataParallel: 2 processes (gloo, CPU) train a MIL model with a
Mammoth patch embedding for a few SGD steps, each on half of the bags; the
parameters must equal one process training on all bags.

The sdpa backend is used: the triton backend on CPU runs under the Triton
interpreter, too slow for a multi-process test (on GPUs DDP wraps the triton
backend the same way: nothing in the layer is rank-specific).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mammoth_fast.mil import create_model

IN_DIM, WORLD, BAGS_PER_RANK, STEPS, LR = 16, 2, 2, 3, 0.5
LENGTHS = [7, 3, 11, 5]  # bag lengths: rank r trains on bags r*2, r*2+1


def make_model(keep_slots):
    torch.manual_seed(0)
    moe_args = dict(num_experts=2, num_slots=3, num_heads=2, slot_dim=8, dropout=0.0, keep_slots=keep_slots,
                    backend="sdpa")
    return create_model("abmil.base_mammoth", 2, in_dim=IN_DIM, embed_dim=16, attn_dim=8, dropout=0.0,
                        moe_args=moe_args).double()


def make_data(step):
    """Every bag of one step (unequal lengths, random content) and its labels."""
    g = torch.Generator().manual_seed(100 + step)
    bags = [torch.randn(n, IN_DIM, generator=g, dtype=torch.float64) for n in LENGTHS]
    return bags, torch.randint(2, (len(LENGTHS),), generator=g)


def pad(bags):
    """Bags padded into (B, max_len, Din) with junk, and their (B, max_len) mask."""
    m = max(b.shape[0] for b in bags)
    h = torch.full((len(bags), m, IN_DIM), 7.0, dtype=torch.float64)
    mask = torch.zeros(len(bags), m, dtype=torch.bool)
    for i, b in enumerate(bags):
        h[i, : b.shape[0]], mask[i, : b.shape[0]] = b, True
    return h, mask


def train(net, rank, world):
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()  # mean over the process's bags; DDP averages over processes
    for step in range(STEPS):
        bags, labels = make_data(step)
        per = len(bags) // world
        h, mask = pad(bags[rank * per:(rank + 1) * per])
        opt.zero_grad()
        net(h, mask=mask, label=labels[rank * per:(rank + 1) * per], loss_fn=loss_fn)["loss"].backward()
        opt.step()


def worker(rank, world, init_file, out_file):
    """Trains a model of each keep_slots value (one process group: spawning costs more
    than the training); rank 0 saves their states."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        states = {}
        for keep_slots in (True, False):
            net = DDP(make_model(keep_slots))
            train(net, rank, world)
            states[keep_slots] = net.module.state_dict()
        if rank == 0:
            torch.save(states, out_file)
        dist.barrier()  # leave together: a rank tearing gloo down while the other still works aborts
    finally:
        dist.destroy_process_group()
    # Done and saved: skip the interpreter's teardown, where gloo's threads have
    # aborted a rank under load ("terminate called without an active exception",
    # SIGABRT after the work was done). An exception above still reaches mp.spawn.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_equal_one_process(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(worker, args=(WORLD, str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    ddp_states = torch.load(out_file, weights_only=True)

    for keep_slots in (True, False):
        single = make_model(keep_slots)
        start = {k: v.clone() for k, v in single.state_dict().items()}
        train(single, 0, 1)  # all bags in one padded batch, loss averaged over all of them
        for k, v in single.state_dict().items():
            assert torch.allclose(ddp_states[keep_slots][k], v, rtol=1e-9, atol=1e-11), (keep_slots, k)
        now = single.state_dict()
        assert not torch.equal(start["patch_embed.slot_embeds"], now["patch_embed.slot_embeds"])  # the layer trained
