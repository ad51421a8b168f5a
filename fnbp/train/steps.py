"""The training and evaluation steps, on one device or jitted over a mesh.

One step is the notes' minibatch SGD step (Section 7.2) with the gradient of
Algorithm 3 (:func:`fnbp.backprop`) and an optax update::

    J, grads = fnbp.backprop(model, loss, params, x, y)   # J = mean over examples (7.2)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

:func:`make_train_step` jits exactly that and :func:`make_eval_step` computes
the loss and accuracy without gradients. With a mesh (:func:`fnbp.make_mesh`)
they return a :class:`ShardedTrainStep`/:class:`ShardedEvalStep`, jitted with
``in_shardings``/``out_shardings`` from :mod:`fnbp.train.sharding`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from jax.sharding import Mesh

from fnbp.backprop import Loss
from fnbp.curvature import kfac_factors
from fnbp.nn.layer import Layer, Params
from fnbp.train import precision as _precision
from fnbp.train import preconditioning as _kfac
from fnbp.train import sharding as _sharding
from fnbp.train._data_checks import LabelCheck, with_label_check

Metrics = dict[str, Array]


def accuracy(t: Array, y: Array) -> Array:
    """Fraction of examples whose largest logit is the label: mean(argmax t == y)."""
    return jnp.mean((jnp.argmax(t, axis=-1) == y).astype(jnp.float32))


def _is_classification(t: Any, y: Any) -> bool:
    return jnp.issubdtype(y.dtype, jnp.integer) and len(t.shape) == len(y.shape) + 1


def train_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    params: Params,
    opt_state: Any,
    x: Array,
    y: Array,
) -> tuple[Params, Any, Metrics]:
    """One training step, not jitted (see :func:`make_train_step` for the jitted one).

    The gradient is :func:`fnbp.backprop` (Algorithm 3 with the hand-written
    backward functions); ``metrics`` holds ``loss`` (J before the update) and,
    for integer labels, ``accuracy``. With a :func:`fnbp.loss_scaled` optimizer
    the loss is scaled by the S in ``opt_state`` (:mod:`fnbp.train.precision`).
    With K-FAC (:func:`fnbp.train.kfac`, found by its state in ``opt_state``)
    the gradient and the Kronecker factors come from one
    :func:`fnbp.kfac_factors` call, which the optimizer's update receives.
    """
    kfac_state = _kfac.find_kfac_state(opt_state)
    extra = {}
    if kfac_state is None:
        J, grads = _precision.scaled_backprop(model, loss, params, x, y, opt_state)
    else:  # K-FAC: the factors from the step's own backward pass (one sampled column)
        if _precision.loss_scale_of(opt_state) is not None:
            raise ValueError(
                "train_step: K-FAC (fnbp.train.kfac) does not take loss scaling; train in "
                "float32 or bfloat16"
            )
        key = jax.random.fold_in(jax.random.wrap_key_data(kfac_state.key), kfac_state.step)
        J, grads, extra["factors"] = kfac_factors(model, loss, params, x, y, kind="mc", key=key)
    metrics = {"loss": J}
    y = jnp.asarray(y)
    if _is_classification(jax.eval_shape(model.apply, params, x), y):
        # a second forward call; under jit XLA shares it with backprop's forward pass
        metrics["accuracy"] = accuracy(model.apply(params, x), y)
    updates, opt_state = optimizer.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, metrics


_train_step_jit = jax.jit(train_step, static_argnums=(0, 1, 2))


def _batch_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    params: Params,
    opt_state: Any,
    x: Array,
    y: Array,
    order: Array,
    start: Array,
) -> tuple[Params, Any, Metrics]:
    """The step on the minibatch ``order[start:start + batch_size]`` of (x, y)."""
    idx = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
    return train_step(
        model,
        loss,
        optimizer,
        params,
        opt_state,
        jnp.take(x, idx, axis=0),
        jnp.take(y, idx, axis=0),
    )


_batch_step_jit = jax.jit(_batch_step, static_argnums=(0, 1, 2, 3))


def make_train_step(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    min_shard_size: int = _sharding.MIN_SHARD_SIZE,
    precision: _precision.Precision | str | None = None,
) -> Callable[[Params, Any, Array, Array], tuple[Params, Any, Metrics]]:
    """A jitted training step: gradients from :func:`fnbp.backprop`, update from optax.

    With a ``mesh`` (:func:`fnbp.make_mesh`) the step is data parallel: the
    batch's example axis is split over the mesh and the parameters are
    replicated, or on an FSDP mesh the large ones are split over ``"fsdp"``
    (:mod:`fnbp.train.sharding`). It is one program jitted with
    ``in_shardings``/``out_shardings``; XLA sums the devices' parameter
    cotangents, so the step computes what the single-device step does.

    Args:
      model: a :class:`fnbp.Layer` (e.g. ``fnbp.mlp([256, 256, 10])``).
      loss: a per-example loss ``loss(t, y)``, e.g. ``fnbp.cross_entropy_loss``.
      optimizer: any optax ``GradientTransformation`` (``optax.sgd(0.1)``,
        ``optax.adam(1e-3)``, a chain, ...).
      mesh: a device mesh, or None for one device.
      min_shard_size: on an FSDP mesh, parameters with fewer elements stay
        replicated.
      precision: None (no casts), or a :class:`fnbp.Precision` or its name
        (``"bfloat16"``): see :func:`fnbp.with_precision`; ``"float16"`` needs
        a :func:`fnbp.loss_scaled` optimizer.

    Returns:
      ``step(params, opt_state, x, y) -> (params, opt_state, metrics)`` with
      ``metrics = {"loss": J, "accuracy": ...}`` (accuracy for integer labels
      only), J the minibatch's mean loss before the update (eq. 7.2). The
      compiled code is shared by every step made from the same model, loss
      and optimizer objects (and mesh). On a mesh it is a
      :class:`ShardedTrainStep`, which raises ValueError for a batch whose
      length the mesh's device count does not divide. Integer labels are
      checked against the model's outputs on the host (ValueError for one
      outside [0, k)): NumPy labels at every call, device labels once.

    Example::

        optimizer = optax.adam(1e-3)
        step = fnbp.make_train_step(model, fnbp.cross_entropy_loss, optimizer)
        opt_state = optimizer.init(params)
        params, opt_state, metrics = step(params, opt_state, x, y)
    """
    _check_parts("make_train_step", model, loss, optimizer)
    model = _precision.applied("make_train_step", model, precision)
    if mesh is None:
        return with_label_check(
            "train_step", model, functools.partial(_train_step_jit, model, loss, optimizer)
        )
    _sharding.check_mesh("make_train_step", mesh)
    return ShardedTrainStep(model, loss, optimizer, mesh, min_shard_size)


def eval_step(model: Layer, loss: Loss, params: Params, x: Array, y: Array) -> Metrics:
    """Mean loss (and accuracy, for integer labels) of ``model`` on (x, y), no gradient."""
    t = model.apply(params, x)
    losses = loss(t, y)
    metrics = {"loss": jnp.mean(losses, dtype=jnp.promote_types(losses.dtype, jnp.float32))}
    y = jnp.asarray(y)
    if _is_classification(t, y):
        metrics["accuracy"] = accuracy(t, y)
    return metrics


_eval_step_jit = jax.jit(eval_step, static_argnums=(0, 1))


def make_eval_step(
    model: Layer,
    loss: Loss,
    *,
    mesh: Mesh | None = None,
    min_shard_size: int = _sharding.MIN_SHARD_SIZE,
    precision: _precision.Precision | str | None = None,
) -> Callable[[Params, Array, Array], Metrics]:
    """A jitted evaluation: ``eval_step(params, x, y) -> {"loss", "accuracy"}``.

    The loss is the mean over examples of ``loss(model.apply(params, x), y)``,
    computed without any gradient; ``accuracy`` is present for integer labels.
    With a ``mesh`` it is a :class:`ShardedEvalStep`; with a ``precision`` it
    computes as :func:`make_train_step`'s step does.
    """
    _check_parts("make_eval_step", model, loss, None)
    model = _precision.applied("make_eval_step", model, precision)
    if mesh is None:
        return functools.partial(_eval_step_jit, model, loss)
    _sharding.check_mesh("make_eval_step", mesh)
    return ShardedEvalStep(model, loss, mesh, min_shard_size)


# --- the compiled steps on a mesh -----------------------------------------------------

Layout = tuple[Any, tuple[Any, ...]]


def _layout(tree: Any, mesh: Mesh, min_shard_size: int) -> Layout:
    """(treedef, one NamedSharding per leaf): a hashable key for the compiled step."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        jax.sharding.NamedSharding(mesh, _sharding.param_spec(np.shape(leaf), mesh, min_shard_size))
        for leaf in leaves
    )


def _shardings(layout: Layout) -> Any:
    treedef, leaves = layout
    return jax.tree_util.tree_unflatten(treedef, leaves)


# Each is compiled once per (model, loss, optimizer, mesh, layout): later calls
# with the same objects reuse the compiled program.
@functools.lru_cache(maxsize=32)
def _sharded_train_step_jit(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    params_layout: Layout,
    state_layout: Layout,
) -> jax.stages.Wrapped:
    params, state = _shardings(params_layout), _shardings(state_layout)
    batch = _sharding.batch_sharding(mesh)
    return jax.jit(
        functools.partial(train_step, model, loss, optimizer),
        in_shardings=(params, state, batch, batch),
        out_shardings=(params, state, _sharding.replicated(mesh)),
    )


@functools.lru_cache(maxsize=32)
def _sharded_eval_step_jit(
    model: Layer, loss: Loss, mesh: Mesh, params_layout: Layout, data: Hashable
) -> Callable:
    return jax.jit(
        functools.partial(eval_step, model, loss),
        in_shardings=(_shardings(params_layout), data, data),
        out_shardings=_sharding.replicated(mesh),
    )


class ShardedTrainStep:
    """:func:`make_train_step`'s step on a device mesh.

    ``step(params, opt_state, x, y)`` places its arguments (the batch split
    over the mesh, ``PartitionSpec("data")`` or ``PartitionSpec(("data",
    "fsdp"))``; the parameters and optimizer state by
    :func:`fnbp.train.sharding.param_spec`), runs the training step jitted with
    those ``in_shardings``/``out_shardings``, and returns the new parameters
    and state laid out the same way and the metrics replicated.
    ``step.lower(...)`` gives the ``jax.stages.Lowered`` program, whose
    ``compile().input_shardings`` are the layouts actually used.
    """

    def __init__(
        self,
        model: Layer,
        loss: Loss,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        min_shard_size: int,
    ):
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.mesh, self.min_shard_size = mesh, min_shard_size
        self._check_labels = LabelCheck("train_step", model)

    def jitted_for(self, params: Params, opt_state: Any) -> tuple[jax.stages.Wrapped, Any, Any]:
        """The jitted step for parameters and state of these shapes, and their shardings.

        Compiled at its first call; later steps made from the same model, loss,
        optimizer and mesh reuse it.
        """
        params_layout = _layout(params, self.mesh, self.min_shard_size)
        state_layout = _layout(opt_state, self.mesh, self.min_shard_size)
        step = _sharded_train_step_jit(
            self.model, self.loss, self.optimizer, self.mesh, params_layout, state_layout
        )
        return step, _shardings(params_layout), _shardings(state_layout)

    def _placed(
        self, params: Params, opt_state: Any, x: Any, y: Any
    ) -> tuple[jax.stages.Wrapped, tuple]:
        if np.ndim(x) == 0:
            raise ValueError("train_step: x must have a leading example axis, got a scalar")
        _sharding.check_batch("train_step", self.mesh, int(np.shape(x)[0]))
        self._check_labels(params, x, y)
        step, params_sharding, state_sharding = self.jitted_for(params, opt_state)
        batch = _sharding.batch_sharding(self.mesh)
        return step, (
            _sharding.put_tree(params, params_sharding),
            _sharding.put_tree(opt_state, state_sharding),
            _sharding.put(x, batch),
            _sharding.put(y, batch),
        )

    def __call__(
        self, params: Params, opt_state: Any, x: Any, y: Any
    ) -> tuple[Params, Any, Metrics]:
        step, arguments = self._placed(params, opt_state, x, y)
        return step(*arguments)

    def lower(self, params: Params, opt_state: Any, x: Any, y: Any) -> Any:
        """The lowered program for these arguments (``.compile().input_shardings``)."""
        step, arguments = self._placed(params, opt_state, x, y)
        return step.lower(*arguments)


class ShardedEvalStep:
    """:func:`make_eval_step`'s evaluation on a device mesh.

    The batch is split over the mesh when its length divides evenly and is
    replicated otherwise (the last, shorter batch of :func:`evaluate`); the
    parameters are laid out as in training and the metrics are replicated.
    """

    def __init__(self, model: Layer, loss: Loss, mesh: Mesh, min_shard_size: int):
        self.model, self.loss = model, loss
        self.mesh, self.min_shard_size = mesh, min_shard_size

    def __call__(self, params: Params, x: Any, y: Any) -> Metrics:
        params_layout = _layout(params, self.mesh, self.min_shard_size)
        data = (
            _sharding.batch_sharding(self.mesh)
            if np.ndim(x) and np.shape(x)[0] % _sharding.batch_split(self.mesh) == 0
            else _sharding.replicated(self.mesh)
        )
        step = _sharded_eval_step_jit(self.model, self.loss, self.mesh, params_layout, data)
        return step(
            _sharding.put_tree(params, _shardings(params_layout)),
            _sharding.put(x, data),
            _sharding.put(y, data),
        )


def _check_parts(fn: str, model: Any, loss: Any, optimizer: Any) -> None:
    if not isinstance(model, Layer):
        raise TypeError(
            f"{fn}: model must be a fnbp Layer (fnbp.mlp(...), fnbp.serial(...)), "
            f"got {type(model).__name__}"
        )
    if not callable(loss):
        raise TypeError(
            f"{fn}: loss must be callable (t, y) -> per-example loss, got {type(loss).__name__}"
        )
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{fn}: optimizer must be an optax GradientTransformation "
            f"(e.g. optax.adam(1e-3)), got {type(optimizer).__name__}"
        )
