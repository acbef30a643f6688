"""load_mammoth_state_dict: the authors' (mammoth-moe) state_dicts, bare or
under a model's prefix, into our layer and MIL models."""
import pytest
import torch
import torch.nn as nn

from conftest import SIZES
from mammoth_fast import Mammoth
from mammoth_fast.checkpoints import LoadReport, load_mammoth_state_dict, mammoth_prefixes
from mammoth_fast.mil import create_model

mammoth = pytest.importorskip("mammoth", reason="mammoth-moe 0.1.2 is the source of the checkpoints")

SIZE = SIZES["small"]


def upstream_state(prefix: str, seed: int = 3, extra: bool = True):
    """A state_dict of an upstream Mammoth under ``prefix``, plus unrelated keys of its host model."""
    torch.manual_seed(seed)
    up = mammoth.Mammoth(**SIZE)
    state = {prefix + k: v for k, v in up.state_dict().items()}
    if extra and prefix:
        state["classifier.weight"] = torch.randn(2, SIZE["dim"])
    return up, state


def assert_equal_to(ours: Mammoth, up: nn.Module):
    want = up.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("prefix", ["", "patch_embed.", "mlp.router.mammoth.", "module.model.patch_embed."])
@pytest.mark.parametrize("given", [False, True], ids=["detected", "given"])
def test_loads_upstream_layer_under_prefix(prefix, given, tmp_path):
    up, state = upstream_state(prefix)
    assert mammoth_prefixes(state) == [prefix]
    ours = Mammoth(**SIZE)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state}, path)  # also the wrapped-file form
    report = load_mammoth_state_dict(ours, path, prefix=prefix if given else None)
    assert isinstance(report, LoadReport) and report.ok
    assert report.loaded == {"": prefix}
    assert report.ignored == (["classifier.weight"] if prefix else [])
    assert_equal_to(ours, up)
    x = torch.randn(2, 11, SIZE["input_dim"])
    assert torch.allclose(ours.eval()(x), up.eval()(x), atol=1e-5)


def test_loads_into_a_mil_models_patch_embed():
    up, state = upstream_state("mlp.router.mammoth.")  # another host's layout: detected, paired as the only one
    net = create_model("abmil.base_mammoth", 2, in_dim=SIZE["input_dim"], embed_dim=SIZE["dim"],
                       moe_args={k: v for k, v in SIZE.items() if k not in ("input_dim", "dim")})
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("patch_embed.")}
    report = load_mammoth_state_dict(net, state)
    assert report.loaded == {"patch_embed": "mlp.router.mammoth."}
    assert_equal_to(net.patch_embed, up)
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the rest is untouched


def test_pairs_several_mammoths_by_path():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Mammoth(**SIZE), Mammoth(**SIZE)

    up_a, sa = upstream_state("module.a.", seed=1, extra=False)
    up_b, sb = upstream_state("module.b.", seed=2, extra=False)
    net = Two()
    report = load_mammoth_state_dict(net, {**sa, **sb})
    assert report.loaded == {"a": "module.a.", "b": "module.b."}
    assert_equal_to(net.a, up_a)
    assert_equal_to(net.b, up_b)
    with pytest.raises(ValueError, match="ambiguous"):
        load_mammoth_state_dict(net, sa, prefix="module.a.")


def test_wrong_prefix_reports_missing_and_unexpected_keys():
    _, state = upstream_state("patch_embed.")
    ours = Mammoth(**SIZE)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys \(12\).*slot_embeds") as err:
        load_mammoth_state_dict(ours, state, prefix="encoder.")
    assert "unexpected" not in str(err.value)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())  # nothing loaded
    with pytest.raises(ValueError, match="no Mammoth in the checkpoint"):
        load_mammoth_state_dict(ours, {"classifier.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="holds no mammoth_fast.Mammoth"):
        load_mammoth_state_dict(nn.Linear(2, 2), state)


def test_extra_missing_and_mismatched_keys_are_listed():
    _, state = upstream_state("patch_embed.")
    state["patch_embed.router_temperature"] = torch.ones(1)
    del state["patch_embed.wq.bias"]
    ours = Mammoth(**{**SIZE, "share_lora_weights": False})  # shared_weight gains an E axis
    with pytest.raises(ValueError) as err:
        load_mammoth_state_dict(ours, state)
    msg = str(err.value)
    assert "missing keys (1): wq.bias" in msg
    assert "unexpected keys (1): patch_embed.router_temperature" in msg
    assert "patch_embed.expert_heads.lora_layers.shared_weight: checkpoint" in msg and "share_lora_weights" in msg
    report = load_mammoth_state_dict(ours, state, strict=False)  # loads what matches
    assert not report.ok and report.missing == ["wq.bias"]
    assert torch.equal(ours.slot_embeds, state["patch_embed.slot_embeds"])
