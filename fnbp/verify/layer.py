"""check_layer: a :class:`fnbp.Layer`'s backward, sq_norms, sq_grads and init, in float64.

A layer is a record of pure functions (``init``, ``forward``, ``backward``,
``apply``, ``sq_norms``, ``sq_grads``; see :mod:`fnbp.nn.layer`). Three things
can be wrong in one written by hand, and :func:`check_layer` checks each:

- ``backward(params, residuals, v)`` must be B[M, (params, z)](v): it is
  checked, through ``apply`` (a ``jax.custom_vjp`` whose rule is the layer's
  forward/backward), by :func:`fnbp.check_vjp` against autodiff of
  ``forward`` and finite differences, in float64;
- ``sq_norms(params, residuals, v)`` must return, per parameter leaf, each
  example's squared norm ||dparams^(i)||^2 (example i is x[i] with its
  positions), and the same input cotangent as ``backward``;
  ``sq_grads(params, residuals, v)`` per leaf sum_i dparams^(i) (.)
  dparams^(i). Checked against the per-example gradients by autodiff of
  ``forward``, one example at a time (rows ``sq_norms`` (the sum over the
  leaves), ``sq_norms per leaf``, ``sq_norms dz`` and ``sq_grads``); a layer
  with params and no such rule gets a note instead;
- ``init(key, example_shape, dtype)`` must give parameters of the structure,
  shapes and dtypes ``apply`` is called with, and the output shape ``apply``
  returns (row ``init``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.nn.layer import MissingRuleError
from fnbp.verify.check import check_vjp
from fnbp.verify.report import DEFAULT_TOLERANCES, VJPCheck, VJPReport, _row

LAYER_PROBES = ("signs", "large", "offset")
"""Probes check_layer uses by default: the ones with no kink convention.

Autodiff of ``forward`` takes JAX's conventions at kinks (``max(z, 0)`` has
slope 1/2 at 0), which need not be the layer's; zeros and ties are left to
:func:`fnbp.check_vjp` of the rules with their own references.
"""


def _to64(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: (
            np.asarray(x, np.float64)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)
            else np.asarray(x)
        ),
        tree,
    )


def check_layer(
    layer: Any,
    params: Any,
    x: Any,
    *,
    transforms: Sequence[str] = ("jit", "jit(vmap(inputs))", "2nd order"),
    probes: bool | Sequence[str] = LAYER_PROBES,
    seed: int = 0,
    example_axes: int = 1,
    kinks: str = "reference",
) -> VJPReport:
    """Check a Layer's backward, sq_norms, sq_grads and init, in float64.

    Example::

        layer = fnbp.Linear(3)
        _, params = layer.init(jax.random.PRNGKey(0), (4,))
        fnbp.check_layer(layer, params, x).assert_ok()      # x: (n, 4)

    Args:
      layer: a :class:`fnbp.Layer` (from :func:`fnbp.make_layer` or fnbp's own).
      params: its parameters (a pytree of arrays).
      x: an input batch; its first ``example_axes`` axes are example axes.
      transforms: the transforms of :func:`fnbp.check_vjp` for ``backward``.
      probes: the probes of :func:`fnbp.check_vjp` (default :data:`LAYER_PROBES`).
      seed: seed of the random cotangents.
      example_axes: how many leading axes of x are example axes (for
        ``init``). For ``sq_norms`` and ``sq_grads`` example i is ``x[i]``:
        the axes after the first are positions summed into its gradient.
      kinks: as :func:`fnbp.check_vjp`'s: ``"reference"`` (autodiff of
        ``forward`` decides at a kink) or ``"any_subgradient"`` (any value
        between the one-sided derivatives is accepted there, so the
        ``zeros`` probe can be asked for).

    Returns:
      One :class:`fnbp.verify.VJPReport` with the rows of all three checks,
      computed in float64 (the arguments are up-cast; x64 is turned on for
      the check when it is off).

    Raises:
      TypeError: ``layer`` is not a Layer-like record.
      ValueError: as :func:`fnbp.check_vjp`, when ``apply`` rejects the arguments.
    """
    for name in ("init", "forward", "backward", "apply"):
        if not callable(getattr(layer, name, None)):
            raise TypeError(
                f"check_layer: layer must be a fnbp Layer (with init, forward, "
                f"backward, apply); {type(layer).__name__} has no {name}()"
            )
    if isinstance(example_axes, bool) or not isinstance(example_axes, int) or example_axes < 1:
        raise ValueError(f"check_layer: example_axes must be an int >= 1, got {example_axes!r}")
    if np.ndim(x) <= example_axes - 1:
        raise ValueError(f"check_layer: x of shape {np.shape(x)} has no example axis")
    label = getattr(layer, "name", type(layer).__name__)
    wide = contextlib.nullcontext() if jax.config.jax_enable_x64 else jax.enable_x64(True)
    with wide:
        params64, x64 = _to64(params), _to64(x)

        def apply(params, x):
            return layer.apply(params, x)

        def forward(params, x):
            return layer.forward(params, x)[0]

        apply.__name__ = f"{label}.apply"
        report = check_vjp(
            apply,
            params64,
            x64,
            reference=forward,
            transforms=transforms,
            probes=probes,
            seed=seed,
            kinks=kinks,
        )
        tol = DEFAULT_TOLERANCES["float64"]
        rows, notes = list(report.rows), report.notes
        if callable(getattr(layer, "sq_norms", None)):
            more, said = _per_example_rows(layer, params64, x64, tol, seed)
            rows, notes = rows + more, notes + said
        rows.append(_init_row(layer, params, x, example_axes, seed))
    if not report.custom_vjp:
        notes += (f"{label}.apply has no jax.custom_vjp rule",)
    return dataclasses.replace(report, function=label, rows=tuple(rows), notes=notes)


def _per_example_rows(layer, params, x, tol, seed: int) -> tuple[list[VJPCheck], tuple]:
    """The rows of sq_norms and sq_grads against autodiff of forward, one example at a time.

    Example i is ``x[i]`` with every further axis (positions are summed into
    its gradient). A layer with params but without a hook gets a note, no row.
    """
    u, residuals = layer.forward(params, x)
    rng = np.random.default_rng(seed + 7)
    v = jax.device_put(rng.standard_normal(np.shape(u)))

    def one(xi, vi):  # example i's parameter gradient, by autodiff of forward
        _, pull = jax.vjp(lambda p: layer.forward(p, xi[None])[0], params)
        return pull(vi[None])[0]

    per_example = jax.jit(jax.vmap(one))(x, v)
    want_sq = jax.tree_util.tree_map(
        lambda g: np.sum(np.square(np.asarray(g)), axis=tuple(range(1, np.ndim(g)))), per_example
    )
    want_sg = jax.tree_util.tree_map(
        lambda g: np.sum(np.square(np.asarray(g)), axis=0), per_example
    )
    rows: list[VJPCheck] = []
    notes: tuple[str, ...] = ()
    for hook in ("sq_norms", "sq_grads"):
        try:
            out = getattr(layer, hook)(params, residuals, v)
        except MissingRuleError:
            notes += (f"{hook}: none (the per-example functions materialize the gradients)",)
            continue
        except Exception as err:  # a finding: the row says what raised
            rows.append(
                VJPCheck(
                    "params",
                    "eager",
                    hook,
                    math.nan,
                    math.nan,
                    "",
                    tol.rtol,
                    tol.atol,
                    False,
                    f"raised {type(err).__name__}: {err}",
                    diagnosis=f"{hook} raises",
                )
            )
            continue
        if hook == "sq_norms":
            sq, dz = out
            total = sum(
                (np.asarray(q, np.float64) for q in jax.tree_util.tree_leaves(sq)),
                np.zeros(np.shape(x)[:1]),
            )
            want = sum(jax.tree_util.tree_leaves(want_sq), np.zeros(np.shape(x)[:1]))
            _, dz_want = layer.backward(params, residuals, v)
            total_row = _row(
                "params",
                "eager",
                "sq_norms",
                [("{idx}", total, want)],
                tol,
                "per-example sum ||dparams||^2 vs autodiff of forward, one example at a time",
                diagnosis="sq_norms disagrees with the per-example gradients",
            )
            # Right totals with wrong leaves: the norms are filed under the wrong leaves.
            rows += [
                total_row,
                _row(
                    "params",
                    "eager",
                    "sq_norms per leaf",
                    _leaves(sq, want_sq),
                    tol,
                    "each leaf's ||dparams^(i)||^2 vs autodiff of forward",
                    diagnosis=(
                        "sq_norms puts a leaf's norm in another leaf"
                        if total_row.passed
                        else "sq_norms disagrees with the per-example gradients"
                    ),
                ),
                _row(
                    "x",
                    "eager",
                    "sq_norms dz",
                    [("{idx}", dz, dz_want)],
                    tol,
                    "sq_norms' input cotangent vs backward's",
                    diagnosis="sq_norms returns another dz than backward",
                ),
            ]
        else:
            rows.append(
                _row(
                    "params",
                    "eager",
                    "sq_grads",
                    _leaves(out, want_sg),
                    tol,
                    "sum_i dparams^(i) (.) dparams^(i) vs autodiff of forward",
                    diagnosis="sq_grads disagrees with the per-example gradients",
                )
            )
    return rows, notes


def _leaves(got, want) -> list[tuple[str, Any, Any]]:
    """(label, got, want) per leaf, the label naming the leaf's path."""
    paths = jax.tree_util.tree_leaves_with_path(want)
    return [
        (jax.tree_util.keystr(path) + "{idx}", np.asarray(g, np.float64), w)
        for (path, w), g in zip(paths, jax.tree_util.tree_leaves(got))
    ]


def _init_row(layer, params, x, axes: int, seed: int) -> VJPCheck:
    example = tuple(np.shape(x)[axes:])
    leaves = [
        leaf
        for leaf in jax.tree_util.tree_leaves(params)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    ]
    dtype = leaves[0].dtype if leaves else jnp.result_type(x)
    problems = []
    try:
        out_shape, fresh = layer.init(jax.random.PRNGKey(seed), example, dtype)
        made: jax.tree_util.PyTreeDef = jax.tree_util.tree_structure(fresh)
        given: jax.tree_util.PyTreeDef = jax.tree_util.tree_structure(params)
        if made != given:
            problems.append(f"init gives parameters {made}, apply was called with {given}")
        else:
            for path_leaf, leaf in zip(
                jax.tree_util.tree_leaves_with_path(fresh), jax.tree_util.tree_leaves(params)
            ):
                path, new = path_leaf
                if np.shape(new) != np.shape(leaf):
                    problems.append(
                        f"init gives {jax.tree_util.keystr(path)} shape "
                        f"{np.shape(new)}, apply was called with {np.shape(leaf)}"
                    )
        u = jax.eval_shape(layer.apply, params, x)
        if tuple(out_shape) != tuple(u.shape[axes:]):
            problems.append(
                f"init says the output of an example has shape "
                f"{tuple(out_shape)}, apply returns {tuple(u.shape[axes:])}"
            )
    except Exception as err:  # a finding: the row says what raised
        problems.append(f"raised {type(err).__name__}: {err}")
    worst = math.inf if problems else 0.0
    return VJPCheck(
        "(init)",
        "eager",
        "init",
        worst,
        worst,
        "",
        0.0,
        0.0,
        not problems,
        "; ".join(problems) or f"shapes agree for examples of shape {example}",
        diagnosis="init disagrees with apply" if problems else "",
    )
