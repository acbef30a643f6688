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
from .pooling import MaxMIL, MeanMIL
from .transmil import TransMIL

__all__ = [
    "ABMIL", "CLAMSB", "CONFIGS", "DSMIL", "ENCODER_DIMS", "MILModel", "MODELS", "MaxMIL", "MeanMIL", "TransMIL",
    "create_model", "load_checkpoint", "model_names", "parameter_counts", "parameter_table",
]
