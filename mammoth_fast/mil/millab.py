"""MIL-Lab's entry points over our models, so that the authors' examples run with
only the import changed:

    from mammoth_fast.mil.millab import ABMILGatedBaseConfig, ABMILModel, create_model
    model = ABMILModel(ABMILGatedBaseConfig(in_dim=1024, embed_dim=512, num_classes=2,
                                            moe_args={"num_experts": 30}))
    results_dict, log_dict = model(features, loss_fn=nn.CrossEntropyLoss(), label=label,
                                   return_attention=True, return_slide_feats=True)
    model = create_model("abmil.base_mammoth.uni.none", num_classes=5)

As in MIL-Lab, a model class wraps the MIL model as ``.model`` (so state_dict keys
start with ``model.``, and their checkpoints load with load_state_dict unchanged)
and its forward returns (results_dict, log_dict). A config class holds the
model's keyword arguments with MIL-Lab's defaults; keyword arguments given to the
model class override its fields, as in MIL-Lab. Nothing here needs transformers.
For our own API (one output dict, masks, packed bags), use
:func:`mammoth_fast.mil.create_model` and the classes of mammoth_fast.mil.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional

import torch.nn as nn
from torch import Tensor

from . import builder
from .base import MILModel


class MILLabConfig:
    """A model's keyword arguments (in_dim, num_classes and its config keys), with
    MIL-Lab's defaults for the config class; unknown keywords are kept as
    attributes, as MIL-Lab's PretrainedConfig subclasses do."""

    model_type = ""
    defaults: dict = {}

    def __init__(self, **kwargs) -> None:
        for key, value in {**copy.deepcopy(self.defaults), **kwargs}.items():
            setattr(self, key, value)

    def model_kwargs(self) -> dict:
        """The fields the model's constructor takes (MIL-Lab's, and ours such as
        dsmil's ``original`` when set)."""
        accepted = inspect.signature(builder.MODELS[self.model_type]).parameters
        return {key: value for key, value in vars(self).items() if key in self.defaults or key in accepted}

    def to_dict(self) -> dict:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class MILLabModel(nn.Module):
    """MIL-Lab's wrapper: ``self.model`` is our MIL model; forward returns
    (results_dict, log_dict) as MIL-Lab's models do. results_dict: 'logits' (B,
    num_classes) and 'loss' (None without loss_fn and label). log_dict: 'loss' (a
    float, -1 without a loss), every auxiliary loss as a float, 'attention' (our
    model's attention weights) with return_attention, 'slide_feats' (the input
    of the model's slide_head, its last classifier) with return_slide_feats, 'moe_weights' (Mammoth's dispatch
    weights) with return_moe_weights."""

    config_class = MILLabConfig

    def __init__(self, config: Optional[MILLabConfig] = None, **kwargs) -> None:
        super().__init__()
        config = config if config is not None else self.config_class()
        for key, value in kwargs.items():
            setattr(config, key, value)
        self.config = config
        self.model: MILModel = builder.MODELS[config.model_type](**config.model_kwargs())

    def forward(self, h: Tensor, loss_fn: Optional[Callable] = None, label: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, return_attention: bool = False,
                return_slide_feats: bool = False, return_moe_weights: bool = False):
        mask = None if attn_mask is None else attn_mask.bool()
        feats = []
        hook = None
        if return_slide_feats:
            hook = self.model.get_submodule(self.model.slide_head).register_forward_hook(lambda mod, args, out: feats.append(args[0]))
        try:
            out = self.model(h, mask=mask, label=label, loss_fn=loss_fn, return_attention=return_attention,
                             return_moe_weights=return_moe_weights)
        finally:
            if hook is not None:
                hook.remove()
        loss = out.get("loss") if loss_fn is not None and label is not None else None
        results = {"logits": out["logits"], "loss": loss}
        log = {"loss": loss.item() if loss is not None else -1}
        log.update({k: v.item() for k, v in out.items() if k.endswith("_loss") and isinstance(v, Tensor)})
        if return_attention:
            log["attention"] = out.get("attention")
        if return_slide_feats:
            log["slide_feats"] = feats[-1] if feats else None
        if return_moe_weights:
            log["moe_weights"] = out.get("moe_weights")
        return results, log


def _pair(model_type: str, model_name: str, config_name: str, config_defaults: dict):
    config_cls = type(config_name, (MILLabConfig,), {"model_type": model_type, "defaults": config_defaults,
                                                     "__doc__": f"MIL-Lab's {config_name}: {model_type}'s "
                                                                f"keyword arguments with their defaults."})
    model_cls = type(model_name, (MILLabModel,), {"config_class": config_cls,
                                                  "__doc__": f"MIL-Lab's {model_name}: {model_type} wrapped as "
                                                             f"``.model``; see MILLabModel."})
    return config_cls, model_cls


_COMMON = dict(in_dim=1024, num_classes=2)
# MIL-Lab's config classes' defaults (their __init__ signatures at fe36d4e)
ABMILGatedBaseConfig, ABMILModel = _pair("abmil", "ABMILModel", "ABMILGatedBaseConfig", dict(
    _COMMON, gate=True, embed_dim=512, attn_dim=384, num_fc_layers=1, dropout=0.25, moe_args={}))
TransMILConfig, TransMILModel = _pair("transmil", "TransMILModel", "TransMILConfig", dict(
    _COMMON, embed_dim=512, num_fc_layers=1, dropout=0.25, num_attention_layers=2, num_heads=4, moe_args=None))
TransformerConfig, TransformerModel = _pair("transformer", "TransformerModel", "TransformerConfig", dict(
    _COMMON, embed_dim=512, num_fc_layers=1, dropout=0.25, num_attention_layers=2, num_heads=8,
    encoder_mlp_dim=-1, moe_args=None))
DFTDConfig, DFTDModel = _pair("dftd", "DFTDModel", "DFTDConfig", dict(
    _COMMON, embed_dim=512, attention_dim=128, num_residuals=4, num_fc_layers=1, dropout=0.25,
    attention_drop=0.25, num_group=8, total_instance=4, bag_weight=0.7, distill="MaxMinS", moe_args=None))
CLAMConfig, CLAMModel = _pair("clam", "CLAMModel", "CLAMConfig", dict(
    _COMMON, gate=True, embed_dim=512, attention_dim=384, n_fc_layers=1, dropout=0.25, k_sample=8,
    subtyping=False, instance_loss_fn="svm", bag_weight=0.7, moe_args=None))
ILRAConfig, ILRAModel = _pair("ilra", "ILRAModel", "ILRAConfig", dict(
    _COMMON, embed_dim=256, num_attention_layers=2, num_heads=8, topk=64, ln=True, mode="classification",
    moe_args={}))
RRTMILConfig, RRTMILModel = _pair("rrt", "RRTMILModel", "RRTMILConfig", dict(
    _COMMON, mlp_dim=512, embed_dim=512, act="relu", dropout=0.25, pos_pos="none", pos="ppeg", peg_k=7,
    attn="ntrans", pool="attn", region_num=8, n_layers=2, n_heads=8, multi_scale=False, drop_path=0.0,
    da_act="relu", trans_dropout=0.1, ffn=False, ffn_act="gelu", mlp_ratio=4.0, da_gated=False, da_bias=False,
    da_dropout=False, trans_dim=64, n_cycle=1, epeg=False, min_region_num=0, qkv_bias=True, shift_size=False,
    no_norm=False, moe_args=None))
WIKGConfig, WIKGMILModel = _pair("wikg", "WIKGMILModel", "WIKGConfig", dict(
    _COMMON, embed_dim=512, topk=4, agg_type="bi-interaction", pool="attn", dropout=0.25, act="leaky_relu",
    moe_args={}))
DSMILConfig, DSMILModel = _pair("dsmil", "DSMILModel", "DSMILConfig", dict(
    _COMMON, embed_dim=512, num_fc_layers=1, dropout=0.25, attn_dim=384, dropout_v=0.0, moe_args=None))

MODEL_ENTRYPOINTS = {
    "abmil": (ABMILModel, ABMILGatedBaseConfig), "transmil": (TransMILModel, TransMILConfig),
    "transformer": (TransformerModel, TransformerConfig), "dftd": (DFTDModel, DFTDConfig),
    "clam": (CLAMModel, CLAMConfig), "ilra": (ILRAModel, ILRAConfig), "rrt": (RRTMILModel, RRTMILConfig),
    "wikg": (WIKGMILModel, WIKGConfig), "dsmil": (DSMILModel, DSMILConfig),
}


def create_model(model_name: str, num_classes: int = 2, checkpoint_path: str = "", **kwargs) -> MILLabModel:
    """MIL-Lab's create_model: '<model>[.<config>[.<encoder>[.<task>]]]' -> their wrapper
    class (forward returns (results_dict, log_dict); state_dict under ``model.``).
    kwargs override config values; checkpoint_path loads a state_dict saved by MIL-Lab
    (or by this wrapper) strictly. A task other than 'none' needs checkpoint_path
    (their code downloads those weights from the Hugging Face hub)."""
    model, config, encoder, task = builder.parse_name(model_name)
    if model not in MODEL_ENTRYPOINTS:
        raise ValueError(f"create_model({model_name!r}): MIL-Lab has no {model!r}; its models: "
                         f"{sorted(MODEL_ENTRYPOINTS)} (ours: mammoth_fast.mil.create_model)")
    builder.check_task(model_name, task, checkpoint_path)
    model_cls, config_cls = MODEL_ENTRYPOINTS[model]
    values = {**builder.load_config(model, config), "in_dim": builder.ENCODER_DIMS[encoder],
              "num_classes": num_classes}
    net = model_cls(config_cls(**values), **kwargs)
    if checkpoint_path:
        builder.load_checkpoint(net.model, checkpoint_path)
    return net
