"""Our MIL models against the authors' MIL-Lab code (the paper's models).

The fixtures under tests/fixtures/millab/ were made by running their code once
(tests/fixtures/millab/make_fixtures.py, which records the commit): each holds
their wrapper's state_dict (keys under ``model.``) at reduced widths, two bags,
the seed set before each forward and their outputs. Here their checkpoint loads
through create_model(..., checkpoint_path=) and must give their outputs in
float64.
"""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mammoth_fast import Mammoth
from mammoth_fast.mil import create_model, millab

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "millab").glob("*.pt"))
TOL = 1e-9


def load_fixture(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def build(fixture: dict, tmp_path: Path):
    """Our model of the fixture's name and sizes, loaded from their state_dict file."""
    checkpoint = tmp_path / "their_checkpoint.pt"
    torch.save(fixture["state_dict"], checkpoint)
    return create_model(f"{fixture['name']}.uni.none", num_classes=fixture["num_classes"],
                        checkpoint_path=str(checkpoint), in_dim=fixture["in_dim"],
                        **fixture["overrides"]).double().eval()


def run_case(net, case: dict) -> dict:
    random.seed(case["seed"]), np.random.seed(case["seed"]), torch.manual_seed(case["seed"])
    with torch.no_grad():
        return net(case["h"], label=case["label"], loss_fn=nn.CrossEntropyLoss())


def test_fixtures_cover_every_config_their_code_builds_and_stay_small():
    names = {load_fixture(p)["name"] for p in FIXTURES}
    models = {n.split(".")[0] for n in names}
    assert models == {"abmil", "clam", "dftd", "dsmil", "ilra", "rrt", "transformer", "transmil", "wikg"}
    assert {"clam.base", "clam.base_ce", "clam.base_ce_subtyping", "clam.base_subtyping", "clam.base_mammoth",
            "dftd.base_afs"} <= names
    assert all(f"{m}.base" in names and f"{m}.base_mammoth" in names for m in models)
    assert sum(p.stat().st_size for p in FIXTURES) < 2 * 2**20
    assert {load_fixture(p)["commit"] for p in FIXTURES} == {"fe36d4e2661c3fdc45011882da74c63f7d74ab38"}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_their_checkpoint_gives_their_outputs(path, tmp_path):
    fixture = load_fixture(path)
    net = build(fixture, tmp_path)
    for case in fixture["cases"]:
        ours = run_case(net, case)
        theirs = case["results"]
        torch.testing.assert_close(ours["logits"], theirs["logits"], rtol=0, atol=TOL)
        if theirs.get("loss") is not None:
            torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=0, atol=TOL)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_their_state_dict_keys_are_ours(path):
    fixture = load_fixture(path)
    torch.manual_seed(0)
    net = create_model(f"{fixture['name']}.uni", num_classes=fixture["num_classes"], in_dim=fixture["in_dim"],
                       **fixture["overrides"])
    theirs = {k.removeprefix("model."): tuple(v.shape) for k, v in fixture["state_dict"].items()}
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == theirs


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_their_wrapper_classes_load_their_state_dict_unchanged(path):
    """mammoth_fast.mil.millab's create_model gives MIL-Lab's wrapper: their state_dict
    (keys under model.) loads with plain load_state_dict, and forward returns their
    (results_dict, log_dict)."""
    fixture = load_fixture(path)
    model, config = fixture["name"].split(".")
    net = millab.create_model(f"{model}.{config}.uni.none", num_classes=fixture["num_classes"],
                              in_dim=fixture["in_dim"], **fixture["overrides"])
    net.load_state_dict(fixture["state_dict"], strict=True)
    net = net.double().eval()
    case = fixture["cases"][0]
    random.seed(case["seed"]), np.random.seed(case["seed"]), torch.manual_seed(case["seed"])
    with torch.no_grad():
        results, log = net(case["h"], loss_fn=nn.CrossEntropyLoss(), label=case["label"], return_attention=True,
                           return_slide_feats=True)
    torch.testing.assert_close(results["logits"], case["results"]["logits"], rtol=0, atol=TOL)
    assert log["loss"] == pytest.approx(case["results"]["loss"].item(), abs=TOL)
    assert log["attention"] is not None and log["slide_feats"].shape[0] == 1


def test_the_authors_readme_example_runs_with_only_the_import_changed():
    from mammoth_fast.mil.millab import ABMILGatedBaseConfig, ABMILModel
    torch.manual_seed(0)
    config = ABMILGatedBaseConfig(in_dim=1024, embed_dim=512, num_classes=2, moe_args={"num_experts": 30})
    model = ABMILModel(config)
    assert isinstance(model.model.patch_embed, Mammoth) and model.model.patch_embed.lora_rank == 17
    features = torch.randn(1, 100, 1024)
    results_dict, log_dict = model(features, loss_fn=nn.CrossEntropyLoss(), label=torch.LongTensor([1]),
                                   return_attention=True, return_slide_feats=True)
    assert results_dict["logits"].shape == (1, 2) and results_dict["loss"].dim() == 0
    assert log_dict["slide_feats"].shape == (1, 512) and log_dict["attention"].shape[-1] == 10 * 30
    for name in ("abmil", "abmil.base", "abmil.base.uni", "abmil.base.uni.none", "abmil.base_mammoth.conch_v15"):
        net = millab.create_model(name, num_classes=5)
        assert all(k.startswith("model.") for k in net.state_dict())
    with pytest.raises(ValueError, match="Hugging Face hub"):
        millab.create_model("abmil.base.uni.pc108-24k", num_classes=5)
