"""Dtype helpers shared by the rules: dtype in = dtype out.

bf16/f16 GEMMs and convolutions produce their input dtype (the hardware
accumulates in float32); :func:`accumulation_dtype` is for the reductions that
keep float32.
"""

from __future__ import annotations

import jax.numpy as jnp


def accumulation_dtype(*arrays) -> jnp.dtype:
    """The dtype to accumulate a reduction in: at least float32.

    For the sums that need it with float16 and bfloat16 inputs: a bias
    cotangent summed over every example (``mm``, ``conv1d``, ``conv2d``),
    pooling's sums, normalization's statistics. The result is cast back, so
    such a sum does not lose its low bits. Matrix products and convolutions
    do not use it: bf16/f16 GEMMs produce their input dtype; the hardware
    accumulates in float32 (see ``fnbp.rules.linear``).
    """
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def at_least_float32(x):
    """``x`` cast to :func:`accumulation_dtype` (float16 and bfloat16 to float32).

    Element-wise formulas with transcendental functions (GELU, softplus,
    SiLU, the losses) are evaluated in at least float32 and their results
    cast back once: a half-precision intermediate such as beta z or z^3
    would overflow (float16's largest value is 65504) or cancel long before
    the result does, and rounding once leaves the result within half an ulp
    of its dtype. Element-wise work is memory-bound, so the wider arithmetic
    costs nothing measurable; float32 and float64 are unchanged.
    """
    return x.astype(accumulation_dtype(x))
