"""The reference's own round-off below float64, modelled by Monte Carlo arithmetic.

Below float64 a correct rule cannot be more accurate than its reference is
in the same dtype: a rule that computes (1/|z| - z^2/|z|^3) v in float32,
where the exact value is 0, is off by the round-off of the two terms it
subtracts. The check allows for that (the ``round_off`` of
:class:`fnbp.verify.checker._Checker`), and the allowance has to come from
the reference, not from the rule under test (a wrong rule would grant
itself a large one).

Running the reference's program in the working dtype measures its round-off
on one compiler only: XLA may simplify it (z / |z| is exactly +-1, so a
second derivative built from it can come out exactly 0 in float32 on one
version of JAX and carry the terms' round-off on another). So the estimate
is taken from the reference's algorithm instead, by Monte Carlo arithmetic
(Parker, Pierce and Eggert, "Monte Carlo arithmetic", 2000): its jaxpr is
evaluated in float64 with the result of every operation that rounds (an
add, a product, a division, exp, a sum, a dot, ...) multiplied by
1 + eps r, r uniform in [-1, 1] and eps the working dtype's machine epsilon,
:data:`SAMPLES` times. Operations that are exact in floating point (a
negation, abs, max, a select, a reshape, a slice) are left alone. Each
perturbation is a first-order model of one rounding; together they are the
condition-number estimate sum_i |d out / d x_i| |x_i| eps over every
intermediate x_i, sampled: the spread of the results around the exact
float64 value is the round-off a float32 (bfloat16, float16) evaluation of
that algorithm may have, whatever a compiler makes of it.

Nested programs (``jit``, ``custom_jvp``, ``custom_vjp``, ``checkpoint``)
are evaluated operation by operation; other higher-order primitives (loops,
conditionals) count as one operation each.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

SAMPLES = 8
"""Monte Carlo samples of the reference's program per estimate."""

# Primitives whose floating result is exact (no rounding): left unperturbed.
_EXACT = frozenset(
    {
        "neg",
        "abs",
        "sign",
        "max",
        "min",
        "clamp",
        "select_n",
        "reshape",
        "broadcast_in_dim",
        "transpose",
        "squeeze",
        "expand_dims",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "gather",
        "concatenate",
        "pad",
        "rev",
        "copy",
        "copy_p",
        "convert_element_type",
        "reduce_max",
        "reduce_min",
        "argmax",
        "argmin",
        "sort",
        "floor",
        "ceil",
        "round",
        "iota",
        "cummax",
        "cummin",
        "reduce_and",
        "reduce_or",
        "stop_gradient",
        "optimization_barrier",
        "device_put",
        "split",
        "real",
        "imag",
        "copysign",
        "reduce_precision",
        "is_finite",
        "nextafter",
        "squeeze_p",
        "select_and_scatter",
    }
)

# Call-like primitives: their program is evaluated operation by operation.
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
}


def _inner(eqn) -> tuple[Any, Sequence[Any]] | None:
    """(jaxpr, consts) of a call-like equation whose inputs are its program's inputs."""
    name = _CALLS.get(eqn.primitive.name)
    program = eqn.params.get(name) if name else None
    if program is None:
        return None
    jaxpr = getattr(program, "jaxpr", program)
    consts = getattr(program, "consts", ())
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr, consts


def _rounds(eqn) -> bool:
    return eqn.primitive.name not in _EXACT


def _floating(aval: Any) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def count(jaxpr) -> int:
    """How many perturbations one evaluation of ``jaxpr`` draws (entries of rounded results)."""
    total = 0
    for eqn in jaxpr.eqns:
        inner = _inner(eqn)
        if inner is not None:
            total += count(inner[0])
        elif _rounds(eqn):
            total += sum(
                int(np.prod(v.aval.shape))
                for v in eqn.outvars
                if _floating(getattr(v, "aval", None))
            )
    return total


class _Draws:
    """The perturbations of one sample, handed out in the order of :func:`count`."""

    def __init__(self, noise: jax.Array):
        self.noise, self.at = noise, 0

    def __call__(self, x: jax.Array) -> jax.Array:
        size = int(np.prod(np.shape(x)))
        r = self.noise[self.at : self.at + size]
        self.at += size
        return x * (1 + r.reshape(np.shape(x)).astype(x.dtype))


def _evaluate(jaxpr, consts: Sequence[Any], args: Sequence[Any], perturb: _Draws) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        inner = _inner(eqn)
        if inner is not None:
            outs = _evaluate(inner[0], inner[1], values, perturb)
        else:
            outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outs = list(outs) if eqn.primitive.multiple_results else [outs]
            if _rounds(eqn):
                outs = [
                    perturb(x) if _floating(getattr(v, "aval", None)) else x
                    for v, x in zip(eqn.outvars, outs)
                ]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _sampled(spec: tuple, sel: Any, noise: jax.Array, operands: tuple) -> Any:
    """The program ``spec = (program, fk)`` at ``operands``, once per row of ``noise``."""
    program, fk = spec
    closed, shape = jax.make_jaxpr(functools.partial(program, fk, sel), return_shape=True)(
        *operands
    )
    flat = jax.tree_util.tree_leaves(operands)
    treedef: jax.tree_util.PyTreeDef = jax.tree_util.tree_structure(shape)

    def one(row):
        return treedef.unflatten(_evaluate(closed.jaxpr, closed.consts, flat, _Draws(row)))

    return jax.vmap(one)(noise)


def sampled(
    program: Callable[..., Any],
    fk: Any,
    sel: Any,
    operands: tuple,
    dtype: Any,
    seed: int,
    jit: Callable[[Callable], Callable],
) -> Any:
    """``program(fk, sel, *operands)`` under Monte Carlo arithmetic at ``dtype``'s epsilon.

    ``operands`` are float64; the result has a leading axis of
    :data:`SAMPLES`. ``jit`` compiles the sampler (``jit_fast``: one
    program, shared by every call with the same shapes).
    """
    closed = jax.make_jaxpr(functools.partial(program, fk, sel))(*operands)
    n = count(closed.jaxpr)
    eps = float(jnp.finfo(dtype).eps)
    rng = np.random.default_rng(seed)
    noise = jax.device_put(rng.uniform(-eps, eps, (SAMPLES, max(n, 1))))
    return jit(_sampled)((program, fk), sel, noise, operands)
