"""Dtype helpers shared by the rules: dtype in = dtype out."""

from __future__ import annotations

import jax.numpy as jnp


def accumulation_dtype(*arrays) -> jnp.dtype:
    """The dtype to accumulate a contraction in: at least float32.

    float16 and bfloat16 inputs are multiplied with float32 accumulation
    (``preferred_element_type``) and the result is cast back, so a weight
    cotangent summed over many examples does not lose its low bits.
    """
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
