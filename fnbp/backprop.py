"""Algorithm 3: the forward pass that stores, the backward pass that chains B.

For a network J = loss(M_k(... M_1(x)), y) the gradient is computed exactly as
the notes' backpropagation (Section 7.4, Algorithm 3):

1. forward pass: u[0] = x, u[i] = M_i(u[i-1]), storing what each backward
   function needs (the residuals);
2. the training objective is the mean over examples, J = (1/n) sum_i J^(i)
   (eq. 7.2), so the loss cotangent starts at dJ/dJ^(i) = 1/n and
   dJ/du[k] = B[loss, u[k]](1/n);
3. backward pass: for i = k .. 1, (dJ/dparams_i, dJ/du[i-1]) =
   B[M_i, u[i-1]](dJ/du[i]); each parameter gradient is taken as soon as
   dJ/du[i] is known (interleaving, Remark 7.4.3).

Every step uses the hand-written backward functions of the rules; nothing here
differentiates primitives with autodiff. The loss' own rule is called through
``jax.vjp``, so a user's loss with a ``jax.custom_vjp`` rule works too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fnbp.nn import _args
from fnbp.nn.layer import Layer, Params

Loss = Callable[[Array, Array], Array]


def _check(fn: str, model: Any, loss: Any, x: Array, y: Array) -> None:
    if not isinstance(model, Layer):
        raise TypeError(
            f"{fn}: model must be a fnbp Layer (fnbp.mlp(...), fnbp.serial(...)), "
            f"got {type(model).__name__}"
        )
    if not callable(loss):
        raise TypeError(
            f"{fn}: loss must be callable (t, y) -> per-example loss, got {type(loss).__name__}"
        )
    x_shape, y_shape = jnp.shape(x), jnp.shape(y)
    # A 1-D x is one example of a vector-input model (e.g. under jax.vmap): its
    # axis holds features, not examples, and y's may hold targets (mse_loss).
    if len(x_shape) >= 2 and y_shape and x_shape[0] != y_shape[0]:
        raise ValueError(
            f"{fn}: x has {x_shape[0]} examples (x.shape={x_shape}) but y has "
            f"{y_shape[0]} (y.shape={y_shape}); pass one label per example"
        )


def _inputs(fn: str, x: Any, y: Any) -> tuple[Array, Array]:
    """x and y as arrays: nested lists of numbers are converted, anything else refused."""
    x = _args.model_input(fn, x)
    if not isinstance(y, (jax.Array, np.ndarray, np.generic)) and y is not None:
        try:
            y = jnp.asarray(y)
        except (TypeError, ValueError):
            raise TypeError(
                f"{fn}: y must be an array of targets (class labels or values), "
                f"got {type(y).__name__} {y!r:.80}"
            ) from None
    return x, y


def _loss_and_cotangent(
    loss: Loss, t: Array, y: Array, examples: int | None = None, fn: str = "backprop"
):
    """The losses and dJ/dt, for the function named ``fn`` (its errors say which).

    ``examples`` None: J is the mean of all the losses (eq. 7.2). ``examples``
    n: one J^(i) per example along the first axis, the mean of that example's
    losses (one loss per position of a sequence, say), so the rows of dJ/dt
    are the per-example dJ^(i)/dt.
    """
    losses, loss_vjp = jax.vjp(lambda t: loss(t, y), t)
    if examples is not None:
        require_per_example_losses(fn, losses, examples)
    if losses.size == 0:
        raise ValueError(
            f"{fn}: no examples (the model's output has shape "
            f"{jnp.shape(t)}, the loss returned shape {jnp.shape(losses)}); J is "
            f"the mean over the examples (eq. 7.2), so pass at least one"
        )
    count = losses.size if examples is None else losses.size // examples
    v = jnp.full(losses.shape, 1.0 / count, losses.dtype)
    (dt,) = loss_vjp(v)
    return losses, dt


def require_per_example_losses(fn: str, losses: Array, examples: int) -> None:
    """The loss must return one value (or one per position) per example, shape (n, ...)."""
    if jnp.shape(losses)[:1] != (examples,):
        raise ValueError(
            f"{fn}: the loss returned shape {jnp.shape(losses)} for {examples} examples; it "
            f"must return one loss per example, shape ({examples}, ...)"
        )


def backprop(model: Layer, loss: Loss, params: Params, x: Array, y: Array) -> tuple[Array, Params]:
    """J and dJ/dparams by Algorithm 3, with J the mean loss over examples (eq. 7.2).

    Args:
      model: a :class:`fnbp.Layer` (e.g. ``fnbp.mlp([1024, 1024, 10])``).
      loss: per-example loss ``loss(t, y)``, e.g. ``fnbp.cross_entropy_loss``.
      params: the model's parameter pytree (from ``model.init``).
      x: inputs; leading axes are example axes.
      y: targets with the same leading axes.

    Returns:
      ``(J, grads)``: the scalar mean loss (at least float32) and a pytree
      like ``params`` with dJ/dparams in the parameters' dtypes.

    Jit it with the model and loss static:
    ``jax.jit(fnbp.backprop, static_argnums=(0, 1))``.

    ``J`` comes from the forward pass (the rules' ``fwd``, plain code), so
    ``jax.grad`` of the ``J`` returned here is JAX's autodiff of that code, not
    the backward functions; differentiate ``loss(model.apply(params, x), y)``
    (which goes through B) or use ``grads`` itself.
    """
    x, y = _inputs("backprop", x, y)
    _check("backprop", model, loss, x, y)
    return _backprop(model, loss, params, x, y)


def _backprop(model: Layer, loss: Loss, params: Params, x: Array, y: Array):
    """:func:`backprop` without the argument checks (for one example under vmap)."""
    t, residuals = model.forward(params, x)  # forward pass, stored
    losses, dt = _loss_and_cotangent(loss, t, y)  # dJ/du[k] = B[loss](1/n)
    grads, _ = model.backward(params, residuals, dt)  # backward pass
    J = jnp.mean(losses, dtype=jnp.promote_types(losses.dtype, jnp.float32))
    return J, grads
