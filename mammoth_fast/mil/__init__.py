"""MIL models whose patch embedding can be Mammoth, and create_model.

Each model maps bags h (B, M, in_dim) through ``patch_embed`` (Linear + ReLU,
or Mammoth when built with moe_args holding num_experts > 0) and its
aggregator to logits; see :class:`MILModel` for the shared forward.
"""
from .abmil import ABMIL
from .base import MILModel
from .builder import (CONFIGS, ENCODER_DIMS, MODELS, create_model, load_checkpoint, model_names, parameter_counts,
                      parameter_table)
from .clam import CLAMSB
from .dsmil import DSMIL
from .dtfd import DTFDMIL
from .ilra import ILRA
from .pooling import MaxMIL, MeanMIL
from .rrt import RRTMIL
from .transformer import TransformerMIL
from .transmil import TransMIL
from .wikg import WiKG

__all__ = [
    "ABMIL", "CLAMSB", "CONFIGS", "DSMIL", "DTFDMIL", "ENCODER_DIMS", "ILRA", "MILModel", "MODELS", "MaxMIL",
    "MeanMIL", "RRTMIL", "TransMIL", "TransformerMIL", "WiKG", "create_model", "load_checkpoint", "model_names",
    "parameter_counts", "parameter_table",
]
