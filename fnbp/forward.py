"""Forward mode through the hand-written forward functions: jvp, linearize, jacfwd, ggn_vp.

The notes' backward function B[M, z](v) = (dM/dz)^T v has a mirror, the
forward function F[M, z](t) = (dM/dz) t, declared beside it for every rule
(``fnbp.rules.<name>_jvp``) and every layer (``make_layer(..., tangent=...)``).
The two are adjoint: <F t, v> = <t, B v>.

JAX's own forward mode (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``) does
not go through a ``jax.custom_vjp``, so it refuses fnbp's functions. The
functions here trace ``f`` with every rule and layer as a ``jax.custom_jvp``
whose rule is F instead: the forward pass stores each module's residuals and
the tangent pass chains the F's from the first module to the last, the mirror
of Algorithm 3::

    out, tangent_out = fnbp.jvp(lambda p: model.apply(p, x), (params,), (direction,))

They compose with ``jax.jit`` and ``jax.vmap`` around them. Trace ``f`` here
first: a function jitted on its own and already called in reverse mode is
reused from JAX's cache as it was traced (with its ``custom_vjp``); jit the
whole ``fnbp.jvp`` call instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from fnbp.backprop import Loss, _backprop, _check, _inputs
from fnbp.curvature import loss_curvature
from fnbp.nn.layer import Layer, Params, no_forward_function
from fnbp.rules._rule import forward_mode

__all__ = ["ggn_vp", "hvp", "jacfwd", "jvp", "linearize"]

_NOTE = (
    "fnbp.jvp: f was traced in forward mode, with fnbp's rules and layers as custom_jvp "
    "functions; a jax.custom_vjp that is not fnbp's (or a function jitted on its own and "
    "called before, reused from JAX's cache) cannot be: jit the whole fnbp.jvp call, and give "
    "your own layers a forward function (fnbp.make_layer(..., tangent=...))"
)


def _primals(fn: str, primals: Any, tangents: Any) -> tuple[tuple, tuple]:
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError(
            f"{fn}: primals and tangents must be tuples (one entry per argument of f), got "
            f"{type(primals).__name__} and {type(tangents).__name__}; write (x,) for one"
        )
    if len(primals) != len(tangents):
        raise ValueError(
            f"{fn}: primals and tangents must have one entry per argument of f each, got "
            f"{len(primals)} and {len(tangents)}"
        )
    return tuple(primals), tuple(tangents)


def _custom_vjp_rules(jaxpr: Any) -> list[str]:
    """The backward rules' names of the custom_vjp calls in a jaxpr, nested ones included."""
    names = []
    for eqn in jaxpr.eqns:
        if "bwd" in eqn.params and "call_jaxpr" in eqn.params:
            names.append(getattr(eqn.params["bwd"], "__name__", "an unnamed rule"))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's jaxpr, or a Jaxpr
            if hasattr(inner, "eqns"):
                names.extend(_custom_vjp_rules(inner))
    return names


def _traced(call: Callable[[], Any], f: Callable[..., Any], args: tuple) -> Any:
    with forward_mode():
        try:
            return call()
        except TypeError as error:
            try:  # which custom_vjp stopped it: trace f alone, in forward mode
                rules = _custom_vjp_rules(jax.make_jaxpr(f)(*args).jaxpr)
            except Exception:  # f does not trace on its own: keep JAX's error
                rules = []
            if rules:
                raise TypeError(
                    f"fnbp.jvp: f calls the jax.custom_vjp whose backward rule is {rules[0]}, "
                    f"which forward mode cannot go through: give it a forward function "
                    f"(fnbp.rules.declare(..., jvp=...), fnbp.layer_from_rule(..., f_jvp=...)) "
                    f"or, if it is fnbp's and jitted on its own before, jit the whole fnbp.jvp "
                    f"call instead"
                ) from error
            error.add_note(_NOTE)
            raise


def jvp(f: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]) -> tuple:
    """``(f(*primals), J_f tangents)``, through the forward functions F of fnbp's rules.

    As ``jax.jvp``: ``primals`` and ``tangents`` are tuples with one entry per
    argument of ``f``, each tangent a pytree like its primal.

    Args:
      f: a function built from fnbp's rules and layers (``model.apply``, a loss
        of a model, a rule) and plain jnp code.
      primals, tangents: tuples of f's arguments and their tangents.

    Returns:
      ``(out, tangent_out)``.

    Raises:
      TypeError: primals or tangents not tuples; ``f`` calls a
        ``jax.custom_vjp`` that is not fnbp's (a note says what to do).
      ValueError: primals and tangents of different lengths.
      NotImplementedError: a layer or rule of ``f`` without a forward function
        (it is named).
    """
    primals, tangents = _primals("jvp", primals, tangents)
    return _traced(lambda: jax.jvp(f, primals, tangents), f, primals)


def linearize(f: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """``(f(*primals), t -> J_f t)``: as ``jax.linearize``, through fnbp's forward functions.

    The forward pass runs once; the returned linear function applies the
    chained F's to any tangent (it is jit-able and vmap-able).
    """
    return _traced(lambda: jax.linearize(f, *primals), f, primals)


def jacfwd(f: Callable[..., Any], argnums: int | Sequence[int] = 0) -> Callable[..., Any]:
    """The Jacobian of ``f`` by forward mode (``jax.jacfwd``) through fnbp's forward functions.

    One F pass per input entry, batched with ``jax.vmap``: the right choice when
    ``f`` has fewer inputs than outputs.
    """
    argnums = argnums if isinstance(argnums, int) else tuple(argnums)

    def jacobian(*args: Any) -> Any:
        return _traced(lambda: jax.jacfwd(f, argnums=argnums)(*args), f, args)

    return jacobian


# --- curvature-vector products -------------------------------------------------------------


def ggn_vp(
    model: Layer, loss: Loss, params: Params, x: Array, y: Array
) -> Callable[[Params], Params]:
    """``v -> G v`` for the GGN G = (1/N) sum_l J_l^T H_l J_l of the mean loss.

    One forward pass stores the residuals; each product then runs the model's
    forward functions (J v, the mirror of Algorithm 3), the loss Hessian at the
    output as its factor (H u = S (S^T u), the loss's ``hessian_factor``) and
    the backward functions (J^T w, Algorithm 3). N is the number of loss
    values, as in :func:`fnbp.diag_ggn`, whose diagonal this is the matrix of.
    Jit the call and the products together:
    ``jax.jit(lambda p, v: fnbp.ggn_vp(model, loss, p, x, y)(v))``.

    Args:
      model, loss, params, x, y: as :func:`fnbp.backprop`; ``loss`` one of
        fnbp's losses (or a rule declaring ``hessian_factor``).

    Returns:
      The linear map ``v -> G v`` on pytrees like ``params``.

    Raises:
      TypeError: a loss without a Hessian factor; a layer without a forward
        function (NotImplementedError, naming it).
    """
    fn = "ggn_vp"
    rule = loss_curvature(fn, loss)
    x, y = _inputs(fn, x, y)
    _check(fn, model, loss, x, y)
    tangent = model.tangent
    if tangent is None:
        raise no_forward_function(repr(model.name), fn)
    t, residuals = model.forward(params, x)
    losses = jax.eval_shape(loss, t, y)  # their number and shape; the values are not needed
    count = math.prod(losses.shape)
    S = rule.hooks["hessian_factor"](t, y).astype(t.dtype)  # t.shape + (C,)
    per_entry = losses.shape == t.shape  # one loss value per entry of t (logistic)

    def matvec(v: Params) -> Params:
        dt = tangent(params, residuals, v, None)  # J v; x held fixed (no tangent)
        if per_entry:
            w = S[..., 0] * S[..., 0] * dt
        else:
            w = jnp.einsum("...kc,...c->...k", S, jnp.einsum("...kc,...k->...c", S, dt))
        grads, _ = model.backward(params, residuals, w / count)  # J^T H J v / N
        return grads

    return matvec


def hvp(model: Layer, loss: Loss, params: Params, x: Array, y: Array) -> Callable[[Params], Params]:
    """``v -> H v`` for the Hessian of J = mean loss: forward over reverse mode.

    The tangent of :func:`fnbp.backprop`'s gradient along v (``jax.jvp`` of the
    backward pass, which is the rules' B as plain code). Jit the call and the
    products together, as for :func:`ggn_vp`.

    Returns:
      The linear map ``v -> H v`` on pytrees like ``params``.
    """
    fn = "hvp"
    x, y = _inputs(fn, x, y)
    _check(fn, model, loss, x, y)
    _, linear = jax.linearize(lambda p: _backprop(model, loss, p, x, y)[1], params)
    return linear
