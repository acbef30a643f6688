"""The Mammoth ``nn.Module``: parameters, initialization, input checks, backend choice.

Parameter and buffer names, shapes and initialization distributions equal
those of the authors' ``mammoth-moe`` 0.1.2 (SPEC.md section 4), so state
dicts load in both directions with ``strict=True``. The math lives in
:mod:`mammoth_fast.reference` (eager backend), :mod:`mammoth_fast.sdpa_backend`
(dispatch and combine as torch's scaled_dot_product_attention) and the Triton kernels.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import packing, reference, sdpa_backend
from .host_reads import host_reads_allowed
from .reference import MammothParams

logger = logging.getLogger("mammoth_fast")

BACKENDS = ("auto", "eager", "sdpa", "triton")


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a trained ``gamma`` and a zero ``beta`` buffer."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.register_buffer("beta", torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return reference.norm_last(x, self.gamma, self.beta, use_layernorm=True)


class RMSNorm(nn.Module):
    """x / max(||x||, 1e-8) * sqrt(dim) * gamma over the last axis."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return reference.norm_last(x, self.gamma, None, use_layernorm=False)


class ExpertWiseRMSNorm(nn.Module):
    """Holds the per-expert RMS-norm scale ``gamma`` (E, H * do)."""

    def __init__(self, dim: int, num_heads: int, num_experts: int, device=None, dtype=None) -> None:
        super().__init__()
        self.dim, self.num_heads, self.num_experts = dim, num_heads, num_experts
        self.scale = (dim * num_heads) ** 0.5
        self.gamma = nn.Parameter(torch.ones(num_experts, dim * num_heads, device=device, dtype=dtype))


class FactorizedLinear(nn.Module):
    """Low-rank expert weights: shared A (H, dh, r) or per expert (E, H, dh, r),
    its bias a, per-expert B (E, H, r, do) and its bias c (E, H, do)."""

    def __init__(
        self, in_dim: int, out_dim: int, rank: int, num_experts: int, num_heads: int,
        share_weights: bool = True, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.share_weight = share_weights
        lead = (num_heads,) if share_weights else (num_experts, num_heads)
        kw = dict(device=device, dtype=dtype)
        self.shared_weight = nn.Parameter(torch.empty(*lead, in_dim, rank, **kw))
        self.shared_bias = nn.Parameter(torch.randn(*lead, rank, **kw))
        self.expert_weights = nn.Parameter(torch.empty(num_experts, num_heads, rank, out_dim, **kw))
        self.bias = nn.Parameter(torch.empty(num_experts, num_heads, out_dim, **kw))
        # upstream: bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the fan_in of
        # expert_weights (H * r * do); weights kaiming_uniform_(a=sqrt(5), relu).
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.expert_weights)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.shared_weight, a=math.sqrt(5), nonlinearity="relu")
        nn.init.kaiming_uniform_(self.expert_weights, a=math.sqrt(5), nonlinearity="relu")


class MultiheadLinear(nn.Module):
    """The experts' container: ``lora_layers``, the expert-wise ``norm`` and ``dropout``."""

    def __init__(
        self, in_features: int, out_features: int, num_heads: int, num_experts: int,
        lora_rank: int, dropout: float = 0.1, share_weights: bool = False, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.segment_dim = in_features // num_heads
        self.num_heads = num_heads
        self.out_features = out_features // num_heads
        self.num_experts = num_experts
        self.lora_layers = FactorizedLinear(
            self.segment_dim, self.out_features, lora_rank, num_experts, num_heads,
            share_weights, device=device, dtype=dtype,
        )
        self.norm = ExpertWiseRMSNorm(self.out_features, num_heads, num_experts, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)


class Mammoth(nn.Module):
    """Mixture of mini experts: a drop-in replacement for a MIL model's first ``nn.Linear``.

    Same constructor keywords, defaults, attributes and state_dict as
    ``mammoth.Mammoth`` (mammoth-moe 0.1.2). Keyword-only extras:

    backend:      'auto' (default: triton for CUDA tensors, sdpa otherwise),
                  'eager' (the PyTorch reference), 'sdpa' (dispatch and combine as
                  torch's scaled_dot_product_attention, O(N * C) memory) or
                  'triton'. Settable later.
    check_finite: if True, every forward raises ValueError on NaN or Inf in
                  ``feats`` (a device sync); by default they propagate, as
                  through ``nn.Linear``.
    dtype:        parameter dtype at construction.

    ``device`` places every parameter (upstream moves only the expert heads).
    """

    def __init__(
        self,
        input_dim: int,
        dim: int,
        *,
        num_experts: int = 30,
        num_slots: int = 10,
        num_heads: int = 16,
        dropout: float = 0.1,
        slot_dropout: float = 0.0,
        slot_dim: int = 256,
        lora_rank: int = 16,
        auto_rank: bool = True,
        keep_slots: bool = True,
        share_lora_weights: bool = True,
        use_layernorm: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        backend: str = "auto",
        check_finite: bool = False,
        dtype: Optional[torch.dtype] = None,
        **kwargs: object,
    ) -> None:
        super().__init__()
        if kwargs:
            warnings.warn(f"Mammoth ignores unknown keyword arguments {sorted(kwargs)}", stacklevel=2)
        for name, value in (("input_dim", input_dim), ("dim", dim), ("num_experts", num_experts),
                            ("num_slots", num_slots), ("num_heads", num_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mammoth: {name} must be a positive int, got {value!r}")
        for name, value in (("dropout", dropout), ("slot_dropout", slot_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Mammoth: {name} must be in [0, 1), got {value!r}")
        if slot_dim <= 0:
            slot_dim = dim
        if slot_dim % num_heads:
            raise ValueError(f"Mammoth: slot_dim={slot_dim} is not divisible by num_heads={num_heads}")
        if dim % num_heads:
            raise ValueError(f"Mammoth: dim={dim} is not divisible by num_heads={num_heads}")
        if auto_rank:
            lora_rank = reference.auto_rank(input_dim, slot_dim, dim, num_experts)
            if lora_rank < 1:
                raise ValueError(
                    f"Mammoth: auto_rank gives lora_rank={lora_rank} < 1 for input_dim={input_dim}, "
                    f"slot_dim={slot_dim}, dim={dim}, num_experts={num_experts} (the parameter budget "
                    "input_dim*(dim - slot_dim) is too small, e.g. slot_dim >= dim); choose a smaller "
                    "slot_dim or fewer experts, or set auto_rank=False and lora_rank"
                )
            logger.info(
                "Auto-computed LoRA rank: %d (input_dim=%d, slot_dim=%d, output_dim=%d, num_experts=%d)",
                lora_rank, input_dim, slot_dim, dim, num_experts,
            )
        elif not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"Mammoth: lora_rank must be a positive int, got {lora_rank!r}")

        self.input_dim = input_dim
        self.num_experts = num_experts
        self.num_heads = num_heads
        self.num_slots = num_slots
        self.keep_slots = keep_slots
        self.slot_dropout = slot_dropout
        self.slot_dim = slot_dim
        self.lora_rank = lora_rank
        self.use_layernorm = use_layernorm
        self.head_dim = input_dim // num_heads
        self.head_dim_input = slot_dim // num_heads
        self.check_finite = check_finite
        self.backend = backend

        kw = dict(device=device, dtype=dtype)
        norm_klass = LayerNorm if use_layernorm else RMSNorm
        self.wq = nn.Linear(input_dim, slot_dim, bias=True, **kw)
        nn.init.xavier_uniform_(self.wq.weight)
        nn.init.zeros_(self.wq.bias)
        self.norm = norm_klass(slot_dim, **kw)
        self.slot_norm = norm_klass(self.head_dim_input, **kw)
        self.slot_embeds = nn.Parameter(torch.empty(num_experts, num_heads, num_slots, self.head_dim_input, **kw))
        nn.init.xavier_uniform_(self.slot_embeds)
        self.expert_heads = MultiheadLinear(
            slot_dim, dim, num_heads, num_experts, lora_rank, dropout, share_lora_weights, **kw
        )

    # ------------------------------------------------------------------ config
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"Mammoth: unknown backend {value!r}; choose one of {BACKENDS}")
        self._backend = value

    @property
    def dim(self) -> int:
        return self.expert_heads.norm.gamma.shape[1]

    @property
    def share_lora_weights(self) -> bool:
        return self.expert_heads.lora_layers.share_weight

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, dim={self.dim}, num_experts={self.num_experts}, "
            f"num_slots={self.num_slots}, num_heads={self.num_heads}, slot_dim={self.slot_dim}, "
            f"lora_rank={self.lora_rank}, keep_slots={self.keep_slots}, "
            f"share_lora_weights={self.share_lora_weights}, use_layernorm={self.use_layernorm}, "
            f"backend={self.backend!r}"
        )

    def params(self) -> MammothParams:
        """The layer's tensors for the functional reference and the kernels."""
        lora = self.expert_heads.lora_layers
        return MammothParams(
            wq_weight=self.wq.weight,
            wq_bias=self.wq.bias,
            norm_gamma=self.norm.gamma,
            norm_beta=getattr(self.norm, "beta", None),
            slot_embeds=self.slot_embeds,
            slot_gamma=self.slot_norm.gamma,
            slot_beta=getattr(self.slot_norm, "beta", None),
            shared_weight=lora.shared_weight,
            shared_bias=lora.shared_bias,
            expert_weights=lora.expert_weights,
            expert_bias=lora.bias,
            expert_gamma=self.expert_heads.norm.gamma,
            use_layernorm=self.use_layernorm,
        )

    def resolve_backend(self, feats: Tensor) -> str:
        """The backend a forward on ``feats`` runs: 'auto' picks triton for CUDA
        tensors and sdpa otherwise."""
        if self.backend == "auto":
            return "triton" if feats.is_cuda else "sdpa"
        return self.backend

    # ----------------------------------------------------------------- forward
    def _check_input(self, feats: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        if not isinstance(feats, Tensor):
            raise TypeError(f"Mammoth: feats must be a torch.Tensor, got {type(feats).__name__}")
        if feats.dim() not in (2, 3):
            raise ValueError(
                f"Mammoth: feats must be (B, N, input_dim) or (N, input_dim), got shape {tuple(feats.shape)}"
            )
        if feats.shape[-1] != self.input_dim:
            raise ValueError(
                f"Mammoth: feats' last axis is {feats.shape[-1]} but input_dim is {self.input_dim} "
                f"(feats shape {tuple(feats.shape)})"
            )
        if not feats.is_floating_point():
            raise TypeError(f"Mammoth: feats must be a floating-point tensor, got {feats.dtype}")
        weight = self.wq.weight
        if feats.device != weight.device:
            raise ValueError(
                f"Mammoth: feats are on {feats.device} but the layer's parameters are on {weight.device}"
            )
        autocast = torch.is_autocast_enabled(feats.device.type)
        if feats.dtype != weight.dtype and not autocast:
            raise TypeError(
                f"Mammoth: feats dtype {feats.dtype} differs from the parameter dtype {weight.dtype}; "
                "cast one of them, or run under torch.autocast"
            )
        if feats.dim() == 2:
            feats = feats.unsqueeze(0)
        b, n, _ = feats.shape
        if n == 0:
            raise ValueError("Mammoth: empty bag (N = 0 patches); every bag needs at least one patch")
        if self.check_finite and not bool(torch.isfinite(feats).all()):
            raise ValueError("Mammoth: feats hold NaN or Inf (check_finite=True)")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise TypeError(f"Mammoth: mask must be a bool tensor, got {got}")
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if tuple(mask.shape) != (b, n):
                raise ValueError(
                    f"Mammoth: mask shape {tuple(mask.shape)} does not match feats' (B, N) = {(b, n)}"
                )
            if mask.device != feats.device:
                raise ValueError(f"Mammoth: mask is on {mask.device} but feats are on {feats.device}")
            empty = ~mask.any(dim=1)
            if host_reads_allowed(empty) and bool(empty.any()):
                bags = empty.nonzero().flatten().tolist()
                raise ValueError(f"Mammoth: bag(s) {bags} have no unmasked patch (empty bag)")
        return feats, mask

    def _draw_keep_masks(self, feats: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Slot-dropout (B, N, H, P) and expert-output dropout (B, P, D) keep-masks, training only."""
        if not self.training:
            return None, None
        b, n, _ = feats.shape
        p_total = self.num_experts * self.num_slots
        slot_keep = None
        if self.slot_dropout > 0:
            slot_keep = torch.rand(b, n, self.num_heads, p_total, device=feats.device) >= self.slot_dropout
        y_keep = None
        if self.expert_heads.dropout.p > 0:
            y_keep = torch.rand(b, p_total, self.dim, device=feats.device) >= self.expert_heads.dropout.p
        return slot_keep, y_keep

    def forward(
        self, feats: Tensor, return_weights: bool = False, mask: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """feats (B, N, input_dim) or (N, input_dim) -> (B, E*S, dim) with keep_slots,
        else (B, N, dim); an unbatched input gets B = 1, as upstream.

        mask: optional (B, N) bool, False for padded patches: they take no part in
        the routing and get zero output under keep_slots=False.
        cu_seqlens: optional (B + 1,) int32/int64 offsets of B bags packed along N in
        feats (total_N, input_dim), as flash-attention's varlen interface: bag b is
        rows cu_seqlens[b]:cu_seqlens[b+1] and is routed among its own patches only.
        The output is (B, E*S, dim) with keep_slots, else packed (total_N, dim).
        Excludes ``mask``. The bags run padded to the longest (see :meth:`_forward_packed`).
        max_seqlen: with cu_seqlens, the longest bag's length (or any bound above
        it: the bags are padded to it), as flash-attention takes it: torch.compile
        then traces packed bags without a graph break (eager still checks the
        offsets on the host).
        return_weights: also return the dispatch weights, (B, N, E, H, S); packed
        (total_N, E, H, S) with cu_seqlens.
        """
        layout = packing.packed_layout("Mammoth", feats, mask, cu_seqlens, max_seqlen)
        if layout is not None:
            return self._forward_packed(feats, layout, return_weights)
        feats, mask = self._check_input(feats, mask)
        backend = self.resolve_backend(feats)
        if backend == "triton":
            from . import triton_backend

            return triton_backend.forward(self, feats, mask, return_weights)
        if backend == "sdpa":
            return sdpa_backend.forward(self, feats, mask, return_weights)
        slot_keep, y_keep = self._draw_keep_masks(feats)
        out, inter = reference.forward(
            feats, self.params(), keep_slots=self.keep_slots, mask=mask, slot_keep=slot_keep,
            y_keep=y_keep, dropout_p=self.expert_heads.dropout.p, return_intermediates=True,
        )
        if return_weights:
            return out, reference.dispatch_layout(inter["Dw"], self.num_experts)
        return out

    # ------------------------------------------------------ packed (varlen) bags
    def _forward_packed(self, feats: Tensor, layout: packing.PackedLayout, return_weights: bool):
        """Packed bags through the padded path: scatter into (B, max_len, Din) with a
        mask, run, and gather the per-patch outputs back (O(B * max_len * Din) extra
        memory for the padded copy; padding takes no part in the routing)."""
        padded, pad_mask = packing.pad_packed(feats, layout)
        out = self.forward(padded, return_weights=return_weights, mask=pad_mask)
        weights = None
        if return_weights:
            out, weights = out
            weights = packing.unpad(weights, layout)  # (total_N, E, H, S)
        if not self.keep_slots:
            out = packing.unpad(out, layout)  # (total_N, D)
        return (out, weights) if return_weights else out
