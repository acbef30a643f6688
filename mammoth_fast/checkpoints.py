"""Load the authors' checkpoints into our Mammoth layers.

A state_dict saved from mammoth-moe (a bare ``mammoth.Mammoth``) or from a
model holding one under a prefix (``patch_embed.``, ``mlp.router.mammoth.``,
``module.model.patch_embed.`` ...) loads into a :class:`~mammoth_fast.Mammoth`
or into the Mammoth submodule(s) of any model:

    report = load_mammoth_state_dict(model, "authors.pt")          # prefix auto-detected
    report = load_mammoth_state_dict(layer, sd, prefix="mlp.router.mammoth.")

The source prefix is found from the keys ending in ``slot_embeds`` (each
Mammoth has exactly one); with several Mammoths on both sides they are paired
by path (the source prefix ending in the target's module path). Keys outside
the chosen prefix are ignored (and listed in the report); missing, unexpected
and shape-mismatched keys raise a ``ValueError`` that lists them (``strict=False``
loads what matches and reports the rest instead).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .layer import Mammoth

ANCHOR = "slot_embeds"


@dataclass
class LoadReport:
    """What ``load_mammoth_state_dict`` did: target module path -> source prefix,
    and the keys (full source names for unexpected/ignored, target names for
    missing) that did not load."""

    loaded: Dict[str, str] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def __str__(self) -> str:
        lines = [f"loaded {tgt or '<root>'} <- prefix {src!r}" for tgt, src in self.loaded.items()]
        for name, keys in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                           ("shape mismatches", self.shape_mismatch)):
            if keys:
                lines.append(f"{name} ({len(keys)}): " + ", ".join(keys))
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} key(s) outside the Mammoth prefix")
        return "\n".join(lines)


def read_state_dict(state_dict_or_path: Union[str, os.PathLike, Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """A state_dict, or a local file holding one (or a dict holding one under
    'state_dict' or 'model'), loaded on CPU with weights_only=True."""
    state = state_dict_or_path
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
    return dict(state)


def mammoth_prefixes(state: Mapping[str, Tensor]) -> List[str]:
    """The prefixes under which ``state`` holds a Mammoth ('' for a bare one)."""
    return sorted(k[: -len(ANCHOR)] for k in state if k == ANCHOR or k.endswith("." + ANCHOR))


def load_mammoth_state_dict(
    module: nn.Module,
    state_dict_or_path: Union[str, os.PathLike, Mapping[str, Tensor]],
    prefix: Optional[str] = None,
    strict: bool = True,
) -> LoadReport:
    """Load the Mammoth weights of a checkpoint into ``module`` (a Mammoth, or a
    model with Mammoth submodules). ``prefix``: the source keys' prefix (e.g.
    'patch_embed.'; '' for a bare layer); None detects it. Returns a LoadReport;
    with ``strict`` (default) raises ValueError listing missing, unexpected and
    shape-mismatched keys instead of loading partially."""
    state = read_state_dict(state_dict_or_path)
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, Mammoth)]
    if not targets:
        raise TypeError(f"load_mammoth_state_dict: {type(module).__name__} holds no mammoth_fast.Mammoth")
    if prefix is not None:
        if len(targets) > 1:
            raise ValueError(
                f"load_mammoth_state_dict: prefix={prefix!r} is ambiguous for {len(targets)} Mammoths "
                f"({[n for n, _ in targets]}); pass prefix=None to pair them by path, or load into one of them"
            )
        if prefix and not prefix.endswith("."):
            prefix += "."
        pairs = [(targets[0], prefix)]
    else:
        pairs = _pair(targets, mammoth_prefixes(state))

    report = LoadReport()
    used, loads = set(), []
    for (name, target), src in pairs:
        own = target.state_dict()
        sub = {k[len(src):]: v for k, v in state.items() if k.startswith(src)}
        used.update(src + k for k in sub)
        tgt = name + "." if name else ""
        report.missing += [tgt + k for k in own if k not in sub]
        report.unexpected += [src + k for k in sub if k not in own]
        bad = {k for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape)}
        report.shape_mismatch += [
            f"{src + k}: checkpoint {tuple(sub[k].shape)} vs {tgt + k} {tuple(own[k].shape)}" for k in sorted(bad)
        ]
        report.loaded[name] = src
        loads.append((target, {k: v for k, v in sub.items() if k in own and k not in bad}))
    report.ignored = [k for k in state if k not in used]
    if strict and not report.ok:
        hint = ""
        if any("lora_layers" in k for k in report.shape_mismatch):
            hint = " (LoRA shapes differ: check share_lora_weights, lora_rank / auto_rank and the sizes)"
        raise ValueError(f"load_mammoth_state_dict: the checkpoint does not match{hint}:\n{report}")
    for target, sub in loads:
        target.load_state_dict(sub, strict=strict)
    return report


def _pair(targets, prefixes: List[str]):
    """Each target Mammoth (path, module) with its source prefix."""
    if not prefixes:
        raise ValueError("load_mammoth_state_dict: no Mammoth in the checkpoint (no key ends in 'slot_embeds')")
    if len(targets) == 1 and len(prefixes) == 1:
        return [(targets[0], prefixes[0])]
    pairs = []
    for name, m in targets:
        tgt = name + "." if name else ""
        hits = [p for p in prefixes if p.endswith(tgt) and (p == tgt or p[: len(p) - len(tgt)].endswith("."))]
        if len(hits) != 1:
            raise ValueError(
                f"load_mammoth_state_dict: cannot pair the Mammoth at {name or '<root>'!r} with one of the "
                f"checkpoint's Mammoth prefixes {prefixes}; pass prefix= and load into that Mammoth"
            )
        pairs.append(((name, m), hits[0]))
    return pairs
