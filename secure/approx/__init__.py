"""Secure approximations, each written once against :class:`SecureOps`."""

from secure.approx.exp import clipped_exp
from secure.approx.gelu import puma_gelu, puma_silu
from secure.approx.norms import layer_norm, rms_norm
from secure.approx.reciprocal import (
    bounded_reciprocal_start,
    divide_bounded,
    mul_rsqrt,
    reciprocal,
    reciprocal_bounded,
    rsqrt,
)
from secure.approx.softmax import even_power, power_softmax, puma_softmax
from secure.approx.tanh import tanh

__all__ = [
    "bounded_reciprocal_start",
    "clipped_exp",
    "divide_bounded",
    "even_power",
    "layer_norm",
    "mul_rsqrt",
    "power_softmax",
    "puma_gelu",
    "puma_silu",
    "puma_softmax",
    "reciprocal",
    "reciprocal_bounded",
    "rms_norm",
    "rsqrt",
    "tanh",
]
