"""create_model: MIL models by name, ``<model>.<config>.<encoder>[.<task>]``, as MIL-Lab names them.

The configs ship as package data (``configs/<model>.json``, one entry per config,
holding the keys of MIL-Lab's yaml files); the encoder sets in_dim. MIL-Lab's
fourth part, the task whose pretrained weights their code downloads, is taken
with ``checkpoint_path`` pointing at those weights ('none': no weights).

Checkpoints load strictly by name: our module names are MIL-Lab's, so their
training's state_dict (keys under ``model.``, their wrapper's attribute) loads
once that prefix (and DataParallel's ``module.``) is stripped. Nothing is
matched by suffix or guessed; a failed load lists the missing, unexpected and
shape-mismatched keys.
"""
from __future__ import annotations

import inspect
import json
from importlib.resources import files
from typing import Dict, List, Optional, Tuple

import torch

from ..checkpoints import read_state_dict
from .abmil import ABMIL
from .base import MILModel
from .clam import CLAMSB
from .dsmil import DSMIL
from .dtfd import DTFDMIL
from .ilra import ILRA
from .pooling import MaxMIL, MeanMIL
from .rrt import RRTMIL
from .transformer import TransformerMIL
from .transmil import TransMIL
from .wikg import WiKG

MODELS = {"abmil": ABMIL, "clam": CLAMSB, "dsmil": DSMIL, "transmil": TransMIL, "meanmil": MeanMIL, "maxmil": MaxMIL,
          "transformer": TransformerMIL, "ilra": ILRA, "rrt": RRTMIL, "wikg": WiKG, "dftd": DTFDMIL}
ENCODER_DIMS = {  # MIL-Lab's table (hoptimus and hoptimus0 both name H-optimus-0)
    "uni": 1024, "uni_v2": 1536, "conch_v1": 512, "conch_v15": 768, "ctranspath": 768, "gigapath": 1536,
    "virchow": 2560, "virchow2": 2560, "phikon": 768, "phikon_v2": 1024, "hoptimus": 1536, "hoptimus0": 1536,
    "hoptimus1": 1536, "musk": 1024, "resnet50": 1024,
}
NO_TASK = "none"
CHECKPOINT_PREFIXES = ("module.", "model.")  # DataParallel's, then MIL-Lab's wrapper's


def _configs_of(model: str) -> dict:
    return json.loads((files(__package__) / "configs" / f"{model}.json").read_text(encoding="utf-8"))


CONFIGS: Dict[str, Tuple[str, ...]] = {m: tuple(_configs_of(m)) for m in MODELS}


def model_names() -> List[str]:
    """Every three-part name create_model accepts (a fourth part, the task, may follow)."""
    return [f"{m}.{c}.{e}" for m in MODELS for c in CONFIGS[m] for e in ENCODER_DIMS]


def load_config(model: str, config: str) -> dict:
    """The config's keyword arguments (all but in_dim and num_classes), from the package data."""
    return _configs_of(model)[config]


def parse_name(name: str) -> Tuple[str, str, str, str]:
    """'<model>[.<config>[.<encoder>[.<task>]]]' -> (model, config, encoder, task); config
    defaults to base, encoder to uni, task to none, as in MIL-Lab."""
    parts = name.split(".") if isinstance(name, str) else []
    model, config, encoder, task = (parts + ["base", "uni", NO_TASK][len(parts) - 1:] if 1 <= len(parts) <= 4
                                    else [""] * 4)
    if model not in MODELS or config not in CONFIGS[model] or encoder not in ENCODER_DIMS or not task:
        configs = {m: list(c) for m, c in CONFIGS.items()}
        raise ValueError(
            f"unknown model name {name!r}: use <model>.<config>.<encoder>[.<task>] (config, encoder and task "
            f"optional) with model.config in {configs}, encoder in {sorted(ENCODER_DIMS)}"
        )
    return model, config, encoder, task


def create_model(name: str, num_classes: int = 2, checkpoint_path: Optional[str] = None, **overrides) -> MILModel:
    """Build ``<model>.<config>.<encoder>[.<task>]`` (e.g. 'abmil.base_mammoth.conch_v15',
    'abmil.base_mammoth.uni.none'), as MIL-Lab's create_model does. overrides replace
    config values (moe_args as a whole; in_dim too) or set the model's other keyword
    arguments (e.g. the switches that correct a MIL-Lab bug). checkpoint_path loads a state_dict
    saved by MIL-Lab (keys under ``model.``) or by us, strictly (see load_checkpoint); a
    task other than 'none' needs it, since MIL-Lab's task weights come from their hub."""
    model, config, encoder, task = parse_name(name)
    check_task(name, task, checkpoint_path)
    kwargs = {"in_dim": ENCODER_DIMS[encoder], **load_config(model, config)}
    valid = (set(kwargs) | set(inspect.signature(MODELS[model]).parameters)) - {"num_classes"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown override(s) {unknown}; valid: {sorted(valid)}")
    net = MODELS[model](num_classes=num_classes, **{**kwargs, **overrides})
    if checkpoint_path is not None:
        load_checkpoint(net, checkpoint_path)
    return net


def check_task(name: str, task: str, checkpoint_path) -> None:
    """A task other than 'none' names weights that MIL-Lab downloads from its hub:
    they must come as checkpoint_path."""
    if task != NO_TASK and not checkpoint_path:
        raise ValueError(
            f"create_model({name!r}): task {task!r} names pretrained weights that MIL-Lab downloads from the "
            f"Hugging Face hub; download them and pass checkpoint_path=, or use task '{NO_TASK}'"
        )


def load_checkpoint(net: torch.nn.Module, path) -> None:
    """Load a local state_dict (or a dict holding one under 'state_dict' or 'model')
    into net, strictly. Keys may carry MIL-Lab's wrapper prefix ``model.`` and
    DataParallel's ``module.``; nothing else is renamed. A mismatch raises a
    ValueError naming the file and listing the missing, unexpected and
    shape-mismatched keys. The model keeps its dtype: to keep a float64 checkpoint
    exact, convert the model first (``load_checkpoint(net.double(), path)``).
    For the Mammoth weights alone (e.g. a checkpoint of
    another aggregator), use mammoth_fast.checkpoints.load_mammoth_state_dict."""
    state = {_strip(key): value for key, value in read_state_dict(path).items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path} does not match {type(net).__name__} (built with the config's sizes; check the "
                 f"model name, encoder, num_classes and overrides):"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {what} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))
    net.load_state_dict(state, strict=True)


def _strip(key: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def parameter_counts(encoder: str = "uni", num_classes: int = 2) -> Dict[str, Tuple[int, int]]:
    """{model: (parameters with base, with base_mammoth)} at the encoder's in_dim."""
    return {
        m: tuple(sum(p.numel() for p in create_model(f"{m}.{c}.{encoder}", num_classes).parameters())
                 for c in ("base", "base_mammoth"))
        for m in MODELS
    }


def parameter_table(encoder: str = "uni", num_classes: int = 2) -> str:
    """parameter_counts as a markdown table."""
    lines = [f"| model ({encoder}, in_dim {ENCODER_DIMS[encoder]}) | base | base_mammoth | ratio |", "|---|---:|---:|---:|"]
    for m, (base, moe) in parameter_counts(encoder, num_classes).items():
        lines.append(f"| {m} | {base:,} | {moe:,} | {moe / base:.3f} |")
    return "\n".join(lines)
