"""The model builders of the notes: mlp (eq. 7.36), resnet_s (eq. 7.39) and a small cnn."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp

from fnbp.nn import _args
from fnbp.nn.combinators import remat, residual, serial
from fnbp.nn.layer import Layer, make_layer
from fnbp.nn.layers import Conv1D, Conv2D, Flatten, Linear, MaxPool, _init_family, activation_layer


def mlp(
    widths: Sequence[int],
    activation: str | Callable | Layer = "relu",
    *,
    remat_every: int = 0,
    init: str | None = None,
) -> Layer:
    """The multi-layer perceptron of eq. 7.36: MM, sigma, MM, sigma, ..., MM.

    There is no activation after the last MM. Weights use the activation
    rule's initialization family (He for ReLU-like activations, Glorot for
    tanh and sigmoid) unless ``init`` says otherwise; biases start at 0.

    Args:
      widths: output width of each MM, e.g. ``[1024, 1024, 10]``; the input
        width comes from ``init``'s input shape.
      activation: name (``"relu"``, ``"gelu"``, ``"tanh"``, ...), the fnbp
        function (``fnbp.relu``) or a Layer.
      remat_every: 0 stores every activation (the notes' Algorithm 3). k > 0
        groups the hidden (MM, sigma) pairs into segments of k pairs and
        stores only each segment's input (:func:`remat`), recomputing the rest
        in the backward pass.
      init: the MMs' initialization, ``"he"``, ``"glorot"`` or ``"lecun"``
        (see :func:`fnbp.Linear`); ``None`` takes the declared rule's family.
        Required for an activation Layer of your own, which has none.

    Returns:
      A :class:`Layer`; ``init(key, (m,))`` (or ``init(key, m)``) gives
      params, a tuple with one entry per MM and activation layer.

    Raises:
      ValueError: ``widths`` not a non-empty list of positive ints,
        ``remat_every`` not an int >= 0, an unknown activation or init.
    """
    if (
        not isinstance(widths, (list, tuple))
        or not widths
        or not all(_args.is_int(w) and w > 0 for w in widths)
    ):
        raise ValueError(
            f"mlp: widths must be a non-empty list of positive ints, the output "
            f"width of each MM (e.g. [1024, 10]), got {widths!r}"
        )
    widths = [int(w) for w in widths]
    sigma = activation_layer(activation)
    init = _init_family("mlp", sigma, init)
    hidden = [serial(Linear(w, init=init), sigma, name=f"hidden({w})") for w in widths[:-1]]
    remat_every = _args.non_negative_int(
        "mlp",
        "remat_every",
        remat_every,
        "the number of (MM, activation) pairs per rematerialized segment: 0 for none",
    )
    if remat_every:
        hidden = [
            remat(serial(*hidden[i : i + remat_every], name="segment"))
            for i in range(0, len(hidden), remat_every)
        ]
        return serial(*hidden, Linear(widths[-1], init=init), name="mlp")
    layers = []
    for w in widths[:-1]:
        layers += [Linear(w, init=init), sigma]
    return serial(*layers, Linear(widths[-1], init=init), name="mlp")


def resnet_s(
    width: int,
    depth: int,
    num_outputs: int,
    activation: str | Callable | Layer = "relu",
    *,
    init: str | None = None,
) -> Layer:
    """ResNet-S (eq. 7.39): MM(Res(Res(... Res(MM_in(x))))).

    Each Res(z) = z + sigma(MM(sigma(MM(z)))) (eq. 7.38) keeps the width.
    An input MM maps x to ``width`` so the blocks fit inputs of any width;
    the final MM maps to ``num_outputs``.

    Args:
      width: width of the residual stream and of each block's hidden MM.
      depth: number of Res blocks (>= 1).
      num_outputs: output width.
      activation: as in :func:`mlp`.
      init: as in :func:`mlp`.

    Raises:
      ValueError: ``width``, ``depth`` or ``num_outputs`` not a positive int.
    """
    width = _args.positive_int("resnet_s", "width", width, "the residual stream's width")
    depth = _args.positive_int("resnet_s", "depth", depth, "the number of Res blocks")
    num_outputs = _args.positive_int("resnet_s", "num_outputs", num_outputs, "the output width")
    sigma = activation_layer(activation)
    init = _init_family("resnet_s", sigma, init)
    blocks = [
        residual(
            serial(Linear(width, init=init), sigma, Linear(width, init=init), sigma, name="block")
        )
        for _ in range(depth)
    ]
    return serial(
        Linear(width, init=init), *blocks, Linear(num_outputs, init=init), name="resnet_s"
    )


def cnn(
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    *,
    kernel_size: int = 3,
    pool: int = 2,
    activation: str | Callable | Layer = "relu",
    input_ndim: int = 3,
) -> Layer:
    """A small convolutional network for images (H, W, C) or 1-D signals (L, C) or (L,).

    For each entry c of ``channels``: a convolution with c output channels
    ("same" padding), the activation and a max pooling of window and stride
    ``pool``; then Flatten and one MM to ``num_classes``. Images use Conv2D
    (eq. 7.51) and 2-D pooling; signals use Conv1D (eqs. 7.48-7.50) and 1-D
    pooling, a signal of shape (L,) getting one channel first.

    Args:
      num_classes: output width (logits).
      channels: output channels of each convolution stage.
      kernel_size: odd kernel size of every convolution.
      pool: window and stride of every max pooling (1 for none).
      activation: as in :func:`mlp`.
      input_ndim: the number of axes of one example (no batch axis): 3 for
        channels-last images (H, W, C), 2 for signals (L, C), 1 for signals
        (L,). Any leading axes of the input are example axes.

    Raises:
      ValueError: ``num_classes``, ``kernel_size`` (odd) or ``pool`` not a
        positive int, ``channels`` not a non-empty list of positive ints, or
        ``input_ndim`` not 1, 2 or 3.
    """
    num_classes = _args.positive_int("cnn", "num_classes", num_classes, "the output width")
    if (
        not isinstance(channels, (list, tuple))
        or not channels
        or not all(_args.is_int(c) and c > 0 for c in channels)
    ):
        raise ValueError(
            f"cnn: channels must be a non-empty list of positive ints, the output "
            f"channels of each convolution stage (e.g. (16, 32)), got {channels!r}"
        )
    kernel_size = _args.positive_int(
        "cnn", "kernel_size", kernel_size, "every convolution's kernel size"
    )
    if kernel_size % 2 == 0:
        raise ValueError(
            f"cnn: kernel_size must be odd, got {kernel_size}: the convolutions "
            f"pad 'same', which needs an odd kernel; pass {kernel_size + 1}"
        )
    pool = _args.positive_int(
        "cnn", "pool", pool, "the window and stride of every max pooling: 1 for none"
    )
    if input_ndim not in (1, 2, 3) or isinstance(input_ndim, bool):
        raise ValueError(
            f"cnn: input_ndim must be 3 (images (H, W, C)), 2 (signals (L, C)) "
            f"or 1 (signals (L,)), got {input_ndim!r}"
        )
    sigma = activation_layer(activation)
    spatial = 2 if input_ndim == 3 else 1
    conv = Conv2D if spatial == 2 else Conv1D
    layers = [_channel_axis()] if input_ndim == 1 else []
    for c in channels:
        layers += [conv(c, kernel_size), sigma]
        if pool > 1:
            layers.append(MaxPool((pool,) * spatial))
    layers += [Flatten(spatial + 1), Linear(num_classes, init="glorot")]
    return serial(*layers, name="cnn")


def _channel_axis() -> Layer:
    """(..., L) -> (..., L, 1): one channel for a signal given without one; no params."""

    def init(key, input_shape, dtype=jnp.float32):
        return tuple(input_shape) + (1,), ()

    def forward(params, z):
        return z[..., None], ()

    def backward(params, residuals, v):
        return (), v[..., 0]

    def tangent(params, residuals, dparams, dz):
        return dz[..., None]

    return make_layer("channel_axis", init, forward, backward, tangent=tangent)
