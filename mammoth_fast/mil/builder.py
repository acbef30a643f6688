"""create_model: MIL models by name, ``<model>.<config>.<encoder>``.

The configs ship as package data (``configs/<model>.json``, one entry per
config); the encoder sets in_dim. Checkpoints load by key suffix, so prefixes
such as ``module.`` or ``model.`` (the authors' wrapper), or a Mammoth saved
under another attribute name, do not matter.
"""
from __future__ import annotations

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
CONFIGS = ("base", "base_mammoth")
ENCODER_DIMS = {
    "uni": 1024, "uni_v2": 1536, "conch_v1": 512, "conch_v15": 768, "ctranspath": 768, "gigapath": 1536,
    "virchow": 2560, "virchow2": 2560, "phikon": 768, "phikon_v2": 1024, "hoptimus0": 1536, "hoptimus1": 1536,
    "musk": 1024, "resnet50": 1024,
}


def model_names() -> List[str]:
    """Every full name create_model accepts."""
    return [f"{m}.{c}.{e}" for m in MODELS for c in CONFIGS for e in ENCODER_DIMS]


def load_config(model: str, config: str) -> dict:
    """The config's keyword arguments (all but in_dim and num_classes), from the package data."""
    text = (files(__package__) / "configs" / f"{model}.json").read_text(encoding="utf-8")
    return json.loads(text)[config]


def parse_name(name: str) -> Tuple[str, str, str]:
    """'<model>[.<config>[.<encoder>]]' -> (model, config, encoder); config defaults
    to base, encoder to uni."""
    parts = name.split(".")
    model, config, encoder = parts + ["base", "uni"][len(parts) - 1:] if len(parts) <= 3 else ("",) * 3
    if model not in MODELS or config not in CONFIGS or encoder not in ENCODER_DIMS:
        raise ValueError(
            f"unknown model name {name!r}: use <model>.<config>.<encoder> (config and encoder optional) with "
            f"model in {sorted(MODELS)}, config in {list(CONFIGS)}, encoder in {sorted(ENCODER_DIMS)}"
        )
    return model, config, encoder


def create_model(name: str, num_classes: int, checkpoint_path: Optional[str] = None, **overrides) -> MILModel:
    """Build ``<model>.<config>.<encoder>`` (e.g. 'abmil.base_mammoth.conch_v15').
    overrides replace config values (moe_args as a whole; in_dim too);
    checkpoint_path loads a local state_dict (strict, keys matched by suffix)."""
    model, config, encoder = parse_name(name)
    kwargs = {"in_dim": ENCODER_DIMS[encoder], **load_config(model, config)}
    unknown = sorted(set(overrides) - set(kwargs))
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown override(s) {unknown}; valid: {sorted(kwargs)}")
    net = MODELS[model](num_classes=num_classes, **{**kwargs, **overrides})
    if checkpoint_path is not None:
        load_checkpoint(net, checkpoint_path)
    return net


def load_checkpoint(net: torch.nn.Module, path: str) -> None:
    """Load a local state_dict (or a dict holding one under 'state_dict' or
    'model') into net, strictly. A key that is not net's maps to the shortest of
    its dotted suffixes that names a tensor of net, or of net.patch_embed.
    For the Mammoth weights alone (e.g. a checkpoint of another aggregator), use
    mammoth_fast.checkpoints.load_mammoth_state_dict."""
    state = read_state_dict(path)
    names = set(net.state_dict())
    mapped = {_match(key, names): value for key, value in state.items()}
    if len(mapped) != len(state):
        raise ValueError(f"checkpoint {path}: several keys map to the same parameter of {type(net).__name__}")
    net.load_state_dict(mapped, strict=True)


def _match(key: str, names: set) -> str:
    parts = key.split(".")
    for i in range(len(parts)):
        for candidate in (".".join(parts[i:]), "patch_embed." + ".".join(parts[i:])):
            if candidate in names:
                return candidate
    return key  # reported by the strict load


def parameter_counts(encoder: str = "uni", num_classes: int = 2) -> Dict[str, Tuple[int, int]]:
    """{model: (parameters with base, with base_mammoth)} at the encoder's in_dim."""
    return {
        m: tuple(sum(p.numel() for p in create_model(f"{m}.{c}.{encoder}", num_classes).parameters()) for c in CONFIGS)
        for m in MODELS
    }


def parameter_table(encoder: str = "uni", num_classes: int = 2) -> str:
    """parameter_counts as a markdown table."""
    lines = [f"| model ({encoder}, in_dim {ENCODER_DIMS[encoder]}) | base | base_mammoth | ratio |", "|---|---:|---:|---:|"]
    for m, (base, moe) in parameter_counts(encoder, num_classes).items():
        lines.append(f"| {m} | {base:,} | {moe:,} | {moe / base:.3f} |")
    return "\n".join(lines)
