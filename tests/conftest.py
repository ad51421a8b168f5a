"""Test configuration: float64 on, so oracles are exact to ~1e-15."""

import jax

jax.config.update("jax_enable_x64", True)
