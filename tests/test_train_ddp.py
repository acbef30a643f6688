"""`torchrun --nproc-per-node=2 -m mammoth_fast train` on CPU (gloo): two
processes at --batch-size 1 take the steps one process takes at --batch-size 2
(every global batch shared out, DDP averaging the gradients), so the
checkpoints, predictions and results equal a one-process run's.

The sdpa backend runs Mammoth (the triton backend on CPU would run under the
Triton interpreter, too slow for a multi-process test); dropout is off, since
two processes draw other dropout masks than one. The split is fixed (an even
train part: no global batch is padded with repeated bags)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mammoth_fast.cli import main
from mammoth_fast.data import Split, read_labels, write_splits
from mammoth_fast.data.synthetic import make_synthetic_set

MOE = {"num_experts": 2, "num_slots": 2, "num_heads": 2, "slot_dim": 8, "dropout": 0.0, "keep_slots": True}
OVERRIDES = json.dumps({"embed_dim": 16, "attn_dim": 8, "dropout": 0.0, "moe_args": MOE})


def probabilities(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["slide_id"] for r in rows], np.array([[float(v) for k, v in r.items() if k.startswith("prob_")]
                                                    for r in rows])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_torchrun_two_processes_equal_one_process(tmp_path):
    data = make_synthetic_set(tmp_path / "data", layout="clam", num_cases=10, slides_per_case=(2, 2), dim=16,
                              patches=(1, 80), dtype=np.float32, formats=("pt",), signal=2.0, seed=7)
    table = read_labels(data.labels_csv)
    ids = table.slide_ids  # cases in order, two slides each: train 12 slides, val 4, test 4
    write_splits([Split(tuple(ids[:12]), tuple(ids[12:16]), tuple(ids[16:]))], tmp_path / "splits", table)
    common = ["train", "--features", str(tmp_path / "data"), "--labels", str(data.labels_csv), "--model",
              "abmil.base_mammoth", "--splits", str(tmp_path / "splits"), "--epochs", "2", "--lr", "5e-3",
              "--device", "cpu", "--overrides", OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "mammoth_fast", *common, "--out", str(tmp_path / "ddp"), "--batch-size", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "2"]) == 0

    run_ddp, run_one = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("ddp", "one"))
    assert run_ddp["processes"] == 2 and run_one["processes"] == 1
    assert run_ddp["folds"][0]["best_epoch"] == run_one["folds"][0]["best_epoch"]
    for a, b in zip(run_ddp["folds"][0]["history"], run_one["folds"][0]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    state_ddp, state_one = (torch.load(tmp_path / d / "fold_0" / "checkpoint.pt", weights_only=True)["state_dict"]
                            for d in ("ddp", "one"))
    assert torch.load(tmp_path / "ddp" / "fold_0" / "checkpoint.pt", weights_only=True)["model_name"] == \
        "abmil.base_mammoth"
    # attention_c.bias shifts every attention score alike: the softmax cancels it, its gradient
    # is rounding noise (about 1e-9), and Adam's normalized step turns noise into +-lr either way
    assert set(state_ddp) == set(state_one)
    for key, value in state_one.items():
        if key != "global_attn.attention_c.bias":
            assert torch.allclose(state_ddp[key], value, rtol=1e-4, atol=1e-6), key
    ids_ddp, p_ddp = probabilities(tmp_path / "ddp" / "fold_0" / "predictions.csv")
    ids_one, p_one = probabilities(tmp_path / "one" / "fold_0" / "predictions.csv")
    assert ids_ddp == ids_one == list(ids[16:]) and np.allclose(p_ddp, p_one, atol=1e-5)
    res_ddp, res_one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ddp", "one"))
    assert res_ddp["classes"] == res_one["classes"] and res_ddp["mean"] == pytest.approx(res_one["mean"])
    assert sorted(os.listdir(tmp_path / "ddp")) == sorted(os.listdir(tmp_path / "one"))
