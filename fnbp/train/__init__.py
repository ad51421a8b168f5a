"""Training with fnbp's hand-written gradients: the loop, the steps, data, checkpoints.

The floor above :mod:`fnbp.nn` and :mod:`fnbp.rules` (it imports them, never
the command line):

- :mod:`fnbp.train.loop`: :func:`fit`, :func:`evaluate`, :func:`epoch_order`,
  :func:`init_state` (the notes' minibatch SGD, Section 7.2);
- :mod:`fnbp.train.steps`: :func:`make_train_step`, :func:`make_eval_step` and
  their sharded forms;
- :mod:`fnbp.train.data`: :func:`load_dataset` and the label checks;
- :mod:`fnbp.train.checkpoint`: :func:`save_checkpoint`, :func:`load_checkpoint`;
- :mod:`fnbp.train.sharding`: :func:`make_mesh` and the parameter layouts;
- :mod:`fnbp.train.precision`: mixed precision policies and loss scaling;
- :mod:`fnbp.train.dp`: differentially private training (DP-SGD, :class:`DPConfig`,
  ``fit(..., dp=...)``) and its privacy accounting;
- :mod:`fnbp.train.preconditioning`: K-FAC (:func:`kfac`,
  :func:`kfac_preconditioner`), the optax transformation that preconditions
  the gradient with the step's Kronecker factors (:func:`fnbp.kfac_factors`);
- :mod:`fnbp.train.stopping`: stopping ``fit`` cleanly at a step boundary
  (``fit(..., stop=...)``, :func:`stop_on_signals`, :class:`TrainingStopped`).

The names most code needs are also at the top level (``fnbp.fit``,
``fnbp.make_train_step``, ``fnbp.DataError``, ``fnbp.make_mesh``, ...).
"""

from fnbp.train import (
    checkpoint,
    data,
    dp,
    loop,
    precision,
    preconditioning,
    sharding,
    steps,
    stopping,
)
from fnbp.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fnbp.train.data import DataError, Dataset, DataWarning, load_dataset
from fnbp.train.dp import DPConfig
from fnbp.train.loop import (
    FitResult,
    TrainState,
    epoch_order,
    evaluate,
    fit,
    init_state,
    steps_per_epoch,
)
from fnbp.train.precision import (
    DynamicLossScale,
    Precision,
    dynamic_loss_scale,
    loss_scaled,
    with_precision,
)
from fnbp.train.preconditioning import KfacState, kfac, kfac_preconditioner
from fnbp.train.sharding import initialize_distributed, make_mesh
from fnbp.train.steps import (
    ShardedEvalStep,
    ShardedTrainStep,
    accuracy,
    eval_step,
    make_eval_step,
    make_train_step,
    train_step,
)
from fnbp.train.stopping import StopRequest, TrainingStopped, stop_on_signals

__all__ = [
    # the loop and the steps
    "FitResult",
    "TrainState",
    "epoch_order",
    "evaluate",
    "fit",
    "init_state",
    "steps_per_epoch",
    "ShardedEvalStep",
    "ShardedTrainStep",
    "accuracy",
    "eval_step",
    "make_eval_step",
    "make_train_step",
    "train_step",
    # stopping cleanly
    "StopRequest",
    "TrainingStopped",
    "stop_on_signals",
    # data
    "DataError",
    "DataWarning",
    "Dataset",
    "load_dataset",
    # checkpoints
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    # devices and precision
    "initialize_distributed",
    "make_mesh",
    "DynamicLossScale",
    "Precision",
    "dynamic_loss_scale",
    "loss_scaled",
    "with_precision",
    # differential privacy
    "DPConfig",
    # second-order optimization
    "KfacState",
    "kfac",
    "kfac_preconditioner",
    # the modules
    "checkpoint",
    "data",
    "dp",
    "loop",
    "precision",
    "preconditioning",
    "sharding",
    "steps",
    "stopping",
]
