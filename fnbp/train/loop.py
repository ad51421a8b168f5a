"""Training with fnbp's hand-written gradients and any optax optimizer.

One training step is the notes' recipe for minibatch stochastic gradient
descent (Section 7.2) with the gradient computed by backpropagation
(Algorithm 3, :func:`fnbp.backprop`) and the update done by an optax
``GradientTransformation`` (plain SGD is theta <- theta - alpha dJ/dtheta;
momentum and Adam keep state)::

    J, grads = fnbp.backprop(model, loss, params, x, y)   # J = mean over examples (7.2)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

:func:`make_train_step` jits exactly that, :func:`make_eval_step` computes the
loss and accuracy without gradients, and :func:`fit` loops over epochs of
shuffled minibatches and returns the trained parameters and a metrics history.

Randomness is explicit and reproducible. The order of the examples in epoch
``e`` is :func:`epoch_order` ``(key, e, n)``: a pure function of the key and
the epoch, so two runs with the same key take the same steps, and a run
resumed from a checkpoint at any step continues exactly as if it had never
stopped.

On several devices, pass a mesh (:func:`fnbp.make_mesh`) to
:func:`make_train_step`, :func:`make_eval_step`, :func:`init_state` and
:func:`fit`: the step is then jitted with ``in_shardings``/``out_shardings``
from :mod:`fnbp.train.sharding` (the batch split over the devices, the parameters
replicated or, on an FSDP mesh, the large ones split), and is the same
computation as on one device, up to the order of floating-point additions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from jax.sharding import Mesh

from fnbp.backprop import Loss
from fnbp.nn.layer import Layer, Params
from fnbp.train import dp as _dp
from fnbp.train import precision as _precision
from fnbp.train import sharding as _sharding
from fnbp.train import stopping as _stopping
from fnbp.train._data_checks import check_finite, check_fit_labels
from fnbp.train.steps import (
    Layout,
    Metrics,
    ShardedTrainStep,
    _batch_step_jit,
    _check_parts,
    _layout,
    _shardings,
    accuracy,
    make_eval_step,
)


class TrainState(NamedTuple):
    """Everything :func:`fit` needs to continue a run exactly.

    Attributes:
      params: the parameter pytree.
      opt_state: the optimizer state (``optimizer.init(params)`` at step 0).
      step: optimizer steps taken so far; the epoch is
        ``step // steps_per_epoch``.
      loss_sum: sum of the training losses of this epoch's steps so far.
      correct_sum: sum of the training accuracies of this epoch's steps so far.
    """

    params: Params
    opt_state: optax.OptState
    step: int = 0
    loss_sum: float = 0.0
    correct_sum: float = 0.0


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params: the trained parameters.
      history: one dict per finished epoch: ``epoch`` (1-based), ``step``,
        ``train_loss`` and ``train_accuracy`` (means over the epoch's steps),
        and ``test_loss``/``test_accuracy`` when test data were given.
      state: the final :class:`TrainState` (to save, or to continue with more
        epochs).
    """

    params: Params
    history: list[dict[str, float]]
    state: TrainState


def _initialize(
    model: Layer,
    optimizer: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    dtype: Any,
    key: Array,
) -> tuple[Params, Any]:
    _, params = model.init(key, input_shape, dtype)
    return params, optimizer.init(params)


# Model, loss and optimizer are static arguments (records of functions, hashed by
# identity), so each compiled function is reused for every call with the same
# model, loss and optimizer instead of being traced again.
_initialize_jit = jax.jit(_initialize, static_argnums=(0, 1, 2, 3))


def init_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    key: Array,
    input_shape: tuple[int, ...],
    dtype: Any = jnp.float32,
    *,
    mesh: Mesh | None = None,
    min_shard_size: int = _sharding.MIN_SHARD_SIZE,
) -> TrainState:
    """Initial parameters and optimizer state at step 0, in one compiled call.

    ``params = model.init(key, input_shape, dtype)[1]`` and
    ``opt_state = optimizer.init(params)``, jitted together so that the many
    small random draws of the initializers compile once instead of one by one.
    With a ``mesh`` they are created where the training step wants them
    (``out_shardings``): replicated, or on an FSDP mesh the large ones split,
    so no device ever holds a whole sharded parameter; the values are the
    same as without a mesh.

    Args:
      model: a :class:`fnbp.Layer`.
      optimizer: an optax ``GradientTransformation``.
      key: the PRNG key of the initialization.
      input_shape: the shape of one example (no batch axis).
      dtype: the parameters' dtype.
      mesh: a device mesh from :func:`fnbp.make_mesh`, or None (one device).
      min_shard_size: on an FSDP mesh, parameters with fewer elements stay
        replicated (see :func:`fnbp.train.sharding.param_spec`).

    Returns:
      A :class:`TrainState` at step 0.

    Raises:
      ValueError: the model does not fit inputs of ``input_shape`` (from the
        model's own init).
    """
    _check_parts("init_state", model, accuracy, optimizer)
    check_key("init_state", key)
    input_shape = tuple(int(d) for d in input_shape)
    if mesh is None:
        params, opt_state = _initialize_jit(model, optimizer, input_shape, jnp.dtype(dtype), key)
        return TrainState(params, opt_state)
    _sharding.check_mesh("init_state", mesh)
    shapes = jax.eval_shape(
        functools.partial(_initialize, model, optimizer, input_shape, jnp.dtype(dtype)), key
    )
    initialize = _sharded_initialize_jit(
        model,
        optimizer,
        input_shape,
        jnp.dtype(dtype),
        mesh,
        _layout(shapes[0], mesh, min_shard_size),
        _layout(shapes[1], mesh, min_shard_size),
    )
    params, opt_state = initialize(_sharding.put(key, _sharding.replicated(mesh)))
    return TrainState(params, opt_state)


@functools.lru_cache(maxsize=32)
def _sharded_initialize_jit(
    model: Layer,
    optimizer: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    dtype: Any,
    mesh: Mesh,
    params_layout: Layout,
    state_layout: Layout,
) -> Callable:
    return jax.jit(
        functools.partial(_initialize, model, optimizer, input_shape, dtype),
        in_shardings=_sharding.replicated(mesh),
        out_shardings=(_shardings(params_layout), _shardings(state_layout)),
    )


def evaluate(
    eval_step: Callable[[Params, Array, Array], Metrics],
    params: Params,
    x: Array,
    y: Array,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Metrics over a whole dataset, in batches of ``batch_size`` examples.

    Batch means are combined weighted by the batch sizes, so the result is the
    mean over all examples whatever the batching.

    Returns:
      A dict of Python floats, e.g. ``{"loss": 0.08, "accuracy": 0.975}``.
    """
    n = int(np.shape(x)[0])
    if n == 0:
        raise ValueError("evaluate: x holds no examples")
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size!r}")
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        metrics = eval_step(params, x[start:stop], y[start:stop])
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * (stop - start)
    return {name: total / n for name, total in totals.items()}


def epoch_order(key: Array, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the examples in epoch ``epoch``: a pure function of (key, epoch).

    A permutation of 0 .. num_examples - 1 drawn by NumPy's PCG64 generator
    seeded with the key's bits and the epoch number. It is computed on the
    host: the order is data bookkeeping, not part of the computation that is
    differentiated, and this way it costs no compilation.

    Args:
      key: a JAX PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey``).
      epoch: the epoch number, >= 0.
      num_examples: the number of training examples n.

    Returns:
      An int32 NumPy array of shape (n,).
    """
    if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch_order: epoch must be an int >= 0, got {epoch!r}")
    check_key("epoch_order", key)
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = [int(w) for w in np.asarray(key, dtype=np.uint32).ravel()]
    generator = np.random.Generator(np.random.PCG64([*words, int(epoch)]))
    return generator.permutation(num_examples).astype(np.int32)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full minibatches per epoch; the last ``num_examples % batch_size`` are skipped.

    The skipped examples differ from epoch to epoch, since the order does.
    """
    return num_examples // batch_size


def check_key(fn: str, key: Any) -> None:
    """Raise TypeError unless ``key`` is one PRNG key.

    A typed key (``jax.random.key(seed)``, shape ()) or a raw one
    (``jax.random.PRNGKey(seed)``: uint32 of shape (2,), or (4,) for the
    ``rbg`` implementations).
    """
    dtype = getattr(key, "dtype", None)
    shape = tuple(np.shape(key)) if dtype is not None else None
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
        raise TypeError(
            f"{fn}: `key` must be one PRNG key, got an array of keys of shape "
            f"{shape}; pass jax.random.key(seed)"
        )
    if dtype is not None and np.dtype(dtype) == np.uint32 and shape in ((2,), (4,)):
        return
    seen = (
        type(key).__name__
        if dtype is None
        else f"an array of dtype {np.dtype(dtype).name} and shape {shape}"
    )
    raise TypeError(f"{fn}: `key` must be a PRNG key, jax.random.key(seed), got {seen}")


def _data(fn: str, name: str, value: Any, host: bool) -> Any:
    """``value`` as a numeric array: a NumPy one (``host``), else a jax.Array."""
    if not isinstance(value, (jax.Array, np.ndarray)):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as error:  # ragged nested lists
            raise TypeError(
                f"{fn}: `{name}` must be an array (n, ...) of numbers; "
                f"np.asarray could not make one ({error})"
            ) from None
    dtype = np.dtype(value.dtype)
    if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
        raise TypeError(f"{fn}: `{name}` must hold numbers, got dtype {dtype}")
    return np.asarray(value) if host else jnp.asarray(value)


def _check_callable(fn: str, name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{fn}: `{name}` must be a function or None, got {type(value).__name__}")


def _check_model_fits(fn: str, model: Layer, params: Params, x: Any) -> Any:
    """The model's output for ``params`` and inputs like ``x``, as a ShapeDtypeStruct
    (abstractly: nothing is computed); raw errors of a wrong ``params`` as fnbp's."""
    example = jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
    try:
        return jax.eval_shape(model.apply, params, example)
    except (TypeError, KeyError, AttributeError, IndexError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise TypeError(
            f"{fn}: the model cannot be applied to `params` and inputs of "
            f"shape {tuple(np.shape(x))} ({type(error).__name__}: "
            f"{detail[:200]}); pass the params of model.init(key, "
            f"{tuple(np.shape(x))[1:]})[1]"
        ) from error


def check_batch_size(fn: str, batch_size: Any, num_examples: int) -> None:
    """Raise ValueError unless ``batch_size`` is an int in [1, num_examples].

    :func:`fit`'s check, callable before a run starts (``fnbp train`` calls it
    before it writes anything). The message names the argument in backticks
    (`batch_size`), as every library message does.
    """
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"{fn}: `batch_size` must be a positive int, got {batch_size!r}")
    if batch_size > num_examples:
        raise ValueError(
            f"{fn}: `batch_size` {batch_size} is larger than the {num_examples} "
            f"training examples; pass a `batch_size` of {num_examples} or less"
        )


def fit(
    model: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    params: Params,
    x: Any,
    y: Any,
    *,
    key: Array,
    epochs: int,
    batch_size: int,
    x_test: Any = None,
    y_test: Any = None,
    state: TrainState | None = None,
    history: list[dict[str, float]] | None = None,
    on_step: Callable[[TrainState, dict[str, float]], None] | None = None,
    on_epoch: Callable[[TrainState, list[dict[str, float]]], None] | None = None,
    eval_batch_size: int = 1024,
    mesh: Mesh | None = None,
    min_shard_size: int = _sharding.MIN_SHARD_SIZE,
    precision: _precision.Precision | str | None = None,
    dp: _dp.DPConfig | None = None,
    stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train for ``epochs`` epochs of shuffled minibatches; deterministic given ``key``.

    Each epoch visits ``steps_per_epoch = n // batch_size`` minibatches in the
    order :func:`epoch_order` gives; each step is :func:`make_train_step`'s
    (gradients from :func:`fnbp.backprop`, update from ``optimizer``). After
    each epoch the test data (if any) are evaluated and a history entry added.

    To continue a run, pass the saved ``state`` and ``history``: training
    resumes at ``state.step`` (mid-epoch too) and ends after ``epochs`` epochs
    in total, with exactly the parameters an uninterrupted run would have.

    To stop a run cleanly, pass ``stop``: it is called at every step boundary
    (before each step, and after each epoch's ``on_epoch``), and once it
    returns true ``fit`` raises :class:`fnbp.train.TrainingStopped` with the
    state and history reached, which continue exactly as above. The request
    of :func:`fnbp.train.stop_on_signals` is such a ``stop``: Ctrl-C and
    SIGTERM then stop at the next step boundary. Without ``stop``, Ctrl-C
    raises ``KeyboardInterrupt`` wherever it arrives, as in any Python code.

    With a ``mesh`` (:func:`fnbp.make_mesh`) training is data parallel: each
    step's minibatch (the same examples as without a mesh) is gathered on the
    host and split over the mesh, the parameters and optimizer state are
    replicated or, on an FSDP mesh, the large ones split, and the step is
    :class:`ShardedTrainStep`'s. The losses and parameters equal the
    single-device run's up to float rounding; a run continued on the same
    mesh is again exact. With several processes every process passes the
    same host data.

    Args:
      model: a :class:`fnbp.Layer`.
      loss: a per-example loss, e.g. ``fnbp.cross_entropy_loss``.
      optimizer: an optax ``GradientTransformation``.
      params: the initial parameters (ignored when ``state`` is given).
      x: training inputs, shape (n, *input_shape), finite.
      y: training targets, shape (n, ...); integer labels get an accuracy,
        float targets must be finite.
      key: the PRNG key of the shuffling (``jax.random.key(seed)``).
      epochs: total number of epochs (including any done before ``state``).
      batch_size: examples per step, 1 <= batch_size <= n.
      x_test: held-out inputs evaluated after every epoch (optional).
      y_test: held-out targets.
      state: a :class:`TrainState` to continue from.
      history: the history of the epochs already done (with ``state``).
      on_step: called after every step with the state and the running means
        of this epoch (``{"loss": ..., "accuracy": ...}``, Python floats). A
        state saved here continues exactly, except at the last step of an
        epoch, whose history entry is not made yet: save those in ``on_epoch``.
      on_epoch: called after every epoch (its history entry made) with the
        state and the history.
      eval_batch_size: batch size of the test evaluation.
      mesh: a device mesh, or None for one device.
      min_shard_size: on an FSDP mesh, parameters with fewer elements stay
        replicated.
      precision: a mixed precision policy, as for :func:`make_train_step`;
        training and test evaluation compute in it.
      dp: a :class:`fnbp.train.DPConfig` for differentially private training
        (:mod:`fnbp.train.dp`): each step is DP-SGD's on a Poisson-sampled
        batch of expected size ``batch_size`` (clipped per-example gradients,
        Gaussian noise), drawn from ``key``; every history entry gets the
        ``epsilon`` spent so far at its ``delta``. One device, float32, and
        the ``dp-accounting`` package (``pip install "fnbp[dp]"``).
      stop: called without arguments at every step boundary; true stops the
        run (:class:`fnbp.train.TrainingStopped`). None: never stopped.

    Returns:
      A :class:`FitResult` ``(params, history, state)``.

    Raises:
      TypeError: a key that is not one PRNG key, inputs that are not arrays
        of numbers, a ``state`` that is not a :class:`TrainState`, callbacks
        that are not callable, or ``params`` the model cannot be applied to.
      ValueError: a batch size outside [1, n], a non-positive epoch count,
        inputs and targets of different lengths, test inputs of another
        shape, a state past ``epochs``, on a mesh a batch size its device
        count does not divide, or an integer label (of y or y_test) outside
        [0, k) for a model of k outputs (checked once on the host before
        training); with ``dp``, a mesh or a precision other than float32.
      fnbp.DataError: NaN or infinity in x, x_test or float targets y,
        y_test (a ValueError, checked once before training, as
        :func:`fnbp.train.data.load_dataset` checks its files).
      ImportError: ``dp`` without the dp-accounting package.
      fnbp.train.TrainingStopped: ``stop`` returned true.
    """
    _check_parts("fit", model, loss, optimizer)
    check_key("fit", key)
    for name, callback in (("on_step", on_step), ("on_epoch", on_epoch), ("stop", stop)):
        _check_callable("fit", name, callback)
    if state is not None and not isinstance(state, TrainState):
        raise TypeError(
            f"fit: `state` must be a fnbp.train.TrainState (from init_state, or "
            f"a FitResult's state), got {type(state).__name__}"
        )
    if history is not None and not (
        isinstance(history, (list, tuple)) and all(isinstance(h, dict) for h in history)
    ):
        raise TypeError(
            f"fit: `history` must be a list of dicts (a FitResult's history), "
            f"got {type(history).__name__}"
        )
    if (
        not isinstance(eval_batch_size, (int, np.integer))
        or isinstance(eval_batch_size, bool)
        or eval_batch_size < 1
    ):
        raise ValueError(f"fit: `eval_batch_size` must be a positive int, got {eval_batch_size!r}")
    if dp is not None:
        _dp.check_options("fit", dp, mesh=mesh, precision=precision)
    model = _precision.applied("fit", model, precision)
    if mesh is not None:
        _sharding.check_mesh("fit", mesh)
    # with a mesh kept on the host: each step's minibatch is placed from there
    x, y = _data("fit", "x", x, mesh is not None), _data("fit", "y", y, mesh is not None)
    n = x.shape[0] if x.ndim else 0
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(
            f"fit: x has {n} examples but y has shape {y.shape}; pass one target per example"
        )
    check_batch_size("fit", batch_size, n)
    if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if (x_test is None) != (y_test is None):
        raise ValueError("fit: pass both x_test and y_test, or neither")
    if x_test is not None:
        x_test = _data("fit", "x_test", x_test, mesh is not None)
        y_test = _data("fit", "y_test", y_test, mesh is not None)
        if x_test.ndim != x.ndim or x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"fit: `x_test` has shape {x_test.shape}, but the examples of "
                f"`x` have shape {x.shape[1:]}; pass test examples of that "
                f"shape"
            )
        if y_test.ndim == 0 or y_test.shape[0] != x_test.shape[0]:
            raise ValueError(
                f"fit: `x_test` has {x_test.shape[0]} examples but `y_test` has "
                f"shape {y_test.shape}; pass one target per example"
            )
    for name, array in (("x", x), ("y", y), ("x_test", x_test), ("y_test", y_test)):
        if array is not None:  # integer labels pass; their range is checked below
            check_finite("fit", f"`{name}`", array)
    if mesh is not None:
        _sharding.check_batch("fit", mesh, int(batch_size), "batch_size")
    per_epoch = steps_per_epoch(n, batch_size)
    total = epochs * per_epoch
    if state is None:
        state = TrainState(params, optimizer.init(params))
    if state.step > total:
        raise ValueError(
            f"fit: the state is at step {state.step}, past the {total} steps of "
            f"{epochs} epochs; pass more epochs"
        )
    history = list(history or [])
    evaluator = None
    if x_test is not None:
        evaluator = make_eval_step(model, loss, mesh=mesh, min_shard_size=min_shard_size)
    output = _check_model_fits("fit", model, state.params, x)
    check_fit_labels(
        "fit",
        model,
        state.params,
        x,
        y,
        x_test,
        y_test,  # once, on the host
        output=output,
    )

    params, opt_state, step = state.params, state.opt_state, int(state.step)
    dp_step = (
        None if dp is None else _dp.Stepper(model, loss, optimizer, dp, x, y, key, int(batch_size))
    )
    if mesh is not None:
        sharded_step, params_sharding, state_sharding = ShardedTrainStep(
            model, loss, optimizer, mesh, min_shard_size
        ).jitted_for(params, opt_state)
        params = _sharding.put_tree(params, params_sharding)
        opt_state = _sharding.put_tree(opt_state, state_sharding)
        batch_sharding = _sharding.batch_sharding(mesh)
    loss_sum, correct_sum = float(state.loss_sum), float(state.correct_sum)

    def check_stop() -> None:  # at a step boundary: the state continues exactly
        if stop is None or not stop():
            return
        if step == 0:
            where = f"at step 0 of {total}, before the first step"
        elif step % per_epoch == 0:
            where = f"at step {step} of {total}, after epoch {step // per_epoch} of {epochs}"
        else:
            where = f"at step {step} of {total}, in epoch {step // per_epoch + 1} of {epochs}"
        _stopping.check(
            stop, where, TrainState(params, opt_state, step, loss_sum, correct_sum), history
        )

    while step < total:
        epoch = step // per_epoch
        if dp_step is None:  # the epoch's order (DP-SGD samples each batch on its own)
            order: np.ndarray | Array = epoch_order(key, epoch, n)
            if mesh is None:
                order = jnp.asarray(order)
        for i in range(step % per_epoch, per_epoch):
            check_stop()
            if dp_step is not None:  # a Poisson-sampled batch, not the epoch's order
                params, opt_state, metrics = dp_step(step, params, opt_state)
            elif mesh is None:
                params, opt_state, metrics = _batch_step_jit(
                    model,
                    loss,
                    optimizer,
                    int(batch_size),
                    params,
                    opt_state,
                    x,
                    y,
                    order,
                    i * batch_size,
                )
            else:
                idx = order[i * batch_size : (i + 1) * batch_size]
                params, opt_state, metrics = sharded_step(
                    params,
                    opt_state,
                    _sharding.put(x[idx], batch_sharding),
                    _sharding.put(y[idx], batch_sharding),
                )
            step += 1
            loss_sum += float(metrics["loss"])
            correct_sum += float(metrics.get("accuracy", 0.0))
            if on_step is not None:
                done = i + 1
                running = {"loss": loss_sum / done}
                if "accuracy" in metrics:
                    running["accuracy"] = correct_sum / done
                on_step(TrainState(params, opt_state, step, loss_sum, correct_sum), running)
        entry: dict[str, float] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / per_epoch,
        }
        if "accuracy" in metrics:
            entry["train_accuracy"] = correct_sum / per_epoch
        if evaluator is not None:
            for name, value in evaluate(evaluator, params, x_test, y_test, eval_batch_size).items():
                entry[f"test_{name}"] = value
        if dp_step is not None:
            entry.update(dp_step.privacy(step))
        history.append(entry)
        loss_sum = correct_sum = 0.0
        state = TrainState(params, opt_state, step, 0.0, 0.0)
        if on_epoch is not None:
            on_epoch(state, history)
        check_stop()
    state = TrainState(params, opt_state, step, loss_sum, correct_sum)
    return FitResult(params, history, state)
