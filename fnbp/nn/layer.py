"""Layers as pure functions over parameter pytrees, and the networks built from them.

A network is a composition of modules, J = M_k(M_{k-1}(... M_1(x))) (eq. 7.60).
Each module is a :class:`Layer`: an immutable record of pure functions

- ``init(key, input_shape, dtype) -> (output_shape, params)``: parameters for
  one example of shape ``input_shape`` (no batch axis);
- ``forward(params, z) -> (u, residuals)``: the forward pass that stores what
  the backward function needs (Algorithm 3, forward pass);
- ``backward(params, residuals, v) -> (dparams, dz)``: the backward function
  B[M, z] for the parameters and the input, built from the hand-written rules;
- ``apply(params, z) -> u``: the forward alone, itself a ``jax.custom_vjp``
  whose rule is ``forward``/``backward``, so ``jax.grad`` in user code gets
  the same hand-written gradients;
- ``sq_norms(params, residuals, v) -> (per_example_sq_norm, dz)``, or ``None``:
  the squared norm of each example's parameter gradient without building the
  per-example gradients (see :func:`fnbp.per_example_grad_norms`).

Leading axes of ``z`` beyond the example shape are example axes (eq. 7.84).
:func:`serial` composes layers and its backward is Algorithm 3 over its
children; :func:`residual` is Res(z) = z + block(z) (eq. 7.38).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

Shape = tuple[int, ...]
Params = Any
Residuals = Any


class Layer(NamedTuple):
    """A module M of the notes as a record of pure functions (see the module doc)."""

    name: str
    init: Callable[..., tuple[Shape, Params]]
    forward: Callable[[Params, Array], tuple[Array, Residuals]]
    backward: Callable[[Params, Residuals, Array], tuple[Params, Array]]
    apply: Callable[[Params, Array], Array]
    sq_norms: Callable[[Params, Residuals, Array], tuple[Array, Array]] | None

    def __repr__(self) -> str:
        return f"Layer({self.name})"


def _make_apply(forward, backward):
    """``apply`` as a custom_vjp whose rule is the layer's own forward/backward."""

    @jax.custom_vjp
    def apply(params, z):
        return forward(params, z)[0]

    def apply_fwd(params, z):
        u, residuals = forward(params, z)
        return u, (params, residuals)

    def apply_bwd(saved, v):
        params, residuals = saved
        return backward(params, residuals, v)

    apply.defvjp(apply_fwd, apply_bwd)
    return apply


def make_layer(
    name: str,
    init: Callable[..., tuple[Shape, Params]],
    forward: Callable[[Params, Array], tuple[Array, Residuals]],
    backward: Callable[[Params, Residuals, Array], tuple[Params, Array]],
    sq_norms: Callable[[Params, Residuals, Array], tuple[Array, Array]] | None = None,
) -> Layer:
    """Build a :class:`Layer` from its init, forward and backward functions.

    Use this for your own modules: write ``forward`` (returning the output and
    the residuals) and ``backward`` (the backward function B), and the layer
    composes with fnbp's in :func:`fnbp.serial`, :func:`fnbp.residual` and
    :func:`fnbp.backprop`. For a rule already written as ``jax.custom_vjp``
    functions ``(f, f_fwd, f_bwd)``, :func:`layer_from_rule` does this for you.

    Args:
      name: the layer's name, shown in errors (``serial[2] scale: ...``).
      init: ``init(key, input_shape, dtype) -> (output_shape, params)`` for one
        example of shape ``input_shape`` (no batch axis); ``output_shape`` is a
        tuple of ints, ``params`` any pytree (``()`` for none).
      forward: ``forward(params, z) -> (u, residuals)``.
      backward: ``backward(params, residuals, v) -> (dparams, dz)``: a *pair*,
        ``dparams`` with the structure of ``params`` (``()`` for none). A
        rule's bwd returns one cotangent per argument instead
        (``fnbp.rules.relu_bwd(res, v) -> (dz,)``); wrap it as
        ``return (), relu_bwd(res, v)[0]``.
      sq_norms: optional ``sq_norms(params, residuals, v) -> (sq_norm, dz)``
        for :func:`fnbp.per_example_grad_norms`.

    Returns:
      The :class:`Layer`; its ``apply`` is a ``jax.custom_vjp`` whose rule is
      ``forward``/``backward``.
    """
    return Layer(name, init, forward, backward, _make_apply(forward, backward), sq_norms)


def _no_params(key, input_shape, dtype=jnp.float32):
    del key, dtype
    return tuple(input_shape), ()

@jax.tree_util.register_static
class _StaticShape:
    """A per-example shape kept in residuals as static data (a pytree with no leaves)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __hash__(self):
        return hash(self.shape)

    def __eq__(self, other):
        return isinstance(other, _StaticShape) and other.shape == self.shape


def layer_from_rule(
    f: Callable,
    f_fwd: Callable,
    f_bwd: Callable,
    *,
    init: Callable[..., tuple[Shape, tuple]] | None = None,
    name: str | None = None,
) -> Layer:
    """A Layer from a rule written as ``jax.custom_vjp`` functions: f, f_fwd, f_bwd.

    The rule is a module M(z, p_1, ..., p_k) whose first argument is the input
    and whose others (none for an activation) are its parameters, written in
    the ``jax.custom_vjp`` style::

        f_fwd(z, *params) -> (u, residuals)
        f_bwd(residuals, v) -> (dz, dp_1, ..., dp_k)   # one per argument of f

    The layer's backward is your ``f_bwd`` (B[M, z] and B[M, p_i]); no
    autodiff is involved. Its params are the tuple ``(p_1, ..., p_k)`` that
    ``init`` makes. Static settings belong in ``f``'s closure
    (``functools.partial``), not in its arguments.

    Args:
      f: the rule's primal function (usually the ``jax.custom_vjp`` itself);
        only its ``__name__`` is read, for the layer's name.
      f_fwd: the forward rule, as passed to ``f.defvjp``.
      f_bwd: the backward rule, as passed to ``f.defvjp``.
      init: ``init(key, input_shape, dtype) -> (output_shape, (p_1, ..., p_k))``
        for a rule with parameters; ``None`` for a parameter-free rule whose
        output has its input's shape.
      name: the layer's name; defaults to ``f.__name__``.

    Returns:
      A :class:`Layer`; use it in :func:`fnbp.serial` like fnbp's own.

    Raises:
      TypeError: ``f_fwd``/``f_bwd``/``init`` not callable (at construction),
        or ``f_bwd`` returning other than one cotangent per argument (when the
        backward pass is traced); the message names the layer.
    """
    for arg, value in (("f_fwd", f_fwd), ("f_bwd", f_bwd)):
        if not callable(value):
            raise TypeError(f"layer_from_rule: {arg} must be the rule's {arg[2:]} function "
                            f"(as passed to f.defvjp), got {type(value).__name__}")
    if init is not None and not callable(init):
        raise TypeError(f"layer_from_rule: init must be a function "
                        f"init(key, input_shape, dtype) -> (output_shape, params), got "
                        f"{type(init).__name__}; pass init=None for a parameter-free rule")
    name = name or getattr(f, "__name__", None) or "rule"

    def init_fn(key, input_shape, dtype=jnp.float32):
        if init is None:
            return _no_params(key, input_shape, dtype)
        output_shape, params = init(key, input_shape, dtype)
        if not isinstance(params, tuple):
            raise TypeError(f"{name}: init must return (output_shape, params) with params the "
                            f"tuple (p_1, ..., p_k) of f's arguments after z; got params of "
                            f"type {type(params).__name__}")
        return tuple(output_shape), params

    def forward(params, z):
        return f_fwd(z, *params)

    def backward(params, residuals, v):
        cotangents = f_bwd(residuals, v)
        expected = 1 + len(params)
        if not isinstance(cotangents, (tuple, list)) or len(cotangents) != expected:
            got = (f"{len(cotangents)} values" if isinstance(cotangents, (tuple, list))
                   else f"a {type(cotangents).__name__}")
            raise TypeError(f"{name}: f_bwd must return a tuple of {expected} cotangents, one "
                            f"per argument of f (z and {len(params)} params), got {got}")
        return tuple(cotangents[1:]), cotangents[0]

    return make_layer(name, init_fn, forward, backward)
