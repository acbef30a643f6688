"""The layer's sizes (SPEC section 1) as one value, the recommended ones by default:
shared by the compile check and the roofline."""
from __future__ import annotations

from dataclasses import dataclass

from .reference import auto_rank


@dataclass(frozen=True)
class LayerSizes:
    """Din, D, C, H, E, S on ``b`` bags; the rank r from auto_rank (17 here)
    unless ``rank`` names one."""

    din: int = 1024
    d: int = 512
    c: int = 256
    h: int = 16
    e: int = 30
    s: int = 10
    b: int = 1
    rank: int = 0  # 0: auto_rank

    @property
    def r(self) -> int:
        return self.rank or auto_rank(self.din, self.c, self.d, self.e)

    @property
    def dh(self) -> int:
        return self.c // self.h

    @property
    def do(self) -> int:
        return self.d // self.h

    @property
    def p(self) -> int:
        return self.e * self.s

    def describe(self) -> str:
        return (f"din={self.din},d={self.d},c={self.c},h={self.h},e={self.e},s={self.s},r={self.r}"
                f" (dh {self.dh}, do {self.do})")
