"""The layer's sizes (SPEC section 1) as one value, the recommended ones by default:
shared by the compile check and the roofline."""
from __future__ import annotations

from dataclasses import dataclass

from .reference import auto_rank


@dataclass(frozen=True)
class LayerSizes:
    """Din, D, C, H, E, S on ``b`` bags; the rank r from auto_rank (17 here)."""

    din: int = 1024
    d: int = 512
    c: int = 256
    h: int = 16
    e: int = 30
    s: int = 10
    b: int = 1

    @property
    def r(self) -> int:
        return auto_rank(self.din, self.c, self.d, self.e)

    @property
    def dh(self) -> int:
        return self.c // self.h

    @property
    def do(self) -> int:
        return self.d // self.h

    @property
    def p(self) -> int:
        return self.e * self.s
