"""Combinators: serial (Algorithm 3 over its children), residual (eq. 7.38) and remat."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from fnbp.nn import _args
from fnbp.nn.layer import (
    TOP,
    BookKeeping,
    Layer,
    Site,
    _layer,
    at_site,
    quiet,
    site,
    tangent_pass,
)


def serial(*layers: Layer, name: str | None = None) -> Layer:
    """Compose layers: serial(M_1, ..., M_k)(z) = M_k(... M_1(z)) (eq. 7.60).

    Its ``backward`` is Algorithm 3: given the residuals stored by the forward
    pass, it chains the children's backward functions from the last to the
    first, taking each child's parameter gradient as soon as the cotangent of
    its output is known. Params are a tuple, one entry per child.

    Its Book-Keeping passes (:class:`fnbp.nn.layer.BookKeeping`) chain the
    children's the same way: the norms pass returns the tuple of the
    children's per-leaf squared norms and of their tapes, and the clipped
    contraction hands each child its own tape and scales; the curvature
    pass carries the loss Hessian's columns back through every child, each
    taking its part (:mod:`fnbp.curvature`).
    """
    for i, layer in enumerate(layers):
        _args.layer("serial", f"argument {i}", layer)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"serial: name must be a non-empty str (shown in errors), got {name!r}")
    name = name or "serial(" + ", ".join(layer.name for layer in layers) + ")"

    def where(i: int) -> str:
        return f"{name.split('(')[0]}[{i}]"

    def init(key, input_shape, dtype=jnp.float32):
        params = []
        shape = tuple(input_shape)
        for i, (layer, layer_key) in enumerate(
            zip(layers, jax.random.split(key, max(len(layers), 1)))
        ):
            with _blame(where(i), layer.name, "init"):
                out = layer.init(layer_key, shape, dtype)
            shape, layer_params = _check_init(where(i), layer.name, shape, out)
            params.append(layer_params)
        return shape, tuple(params)

    def _check_params(params):
        if not isinstance(params, (tuple, list)) or len(params) != len(layers):
            got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
            raise ValueError(
                f"{name}: params must be a tuple of {len(layers)} entries (one per layer), "
                f"got {got}; pass the params made by this model's init"
            )

    def forward(params, z):
        _check_params(params)
        outer = site() or TOP
        residuals = []
        for i, (layer, layer_params) in enumerate(zip(layers, params)):
            # Child i's input is checked: serial's own, or child i - 1's output.
            child = Site(
                f"{outer.prefix}{where(i)} ",
                None if outer.path is None else f"{outer.path}[{i}]",
                checked_input=True,
                quiet=outer.quiet,
            )
            with _blame(where(i), layer.name, "forward"), at_site(child):
                z, layer_residuals = layer.forward(layer_params, z)
            residuals.append(layer_residuals)
        return z, tuple(residuals)

    def backward(params, residuals, v):
        grads = [None] * len(layers)
        for i in reversed(range(len(layers))):
            with _blame(where(i), layers[i].name, "backward"):
                out = layers[i].backward(params[i], residuals[i], v)
            grads[i], v = _check_backward(where(i), layers[i].name, params[i], out)
        return _like(params, grads), v

    def norms(params, residuals, v):
        sq, tapes = [None] * len(layers), [None] * len(layers)
        for i in reversed(range(len(layers))):
            with _blame(where(i), layers[i].name, "sq_norms"):
                sq[i], v, tapes[i] = layers[i].book.norms(params[i], residuals[i], v)
        return _like(params, sq), v, tuple(tapes)

    def clipped(params, tapes, scales):
        grads = []
        for i, layer in enumerate(layers):
            with _blame(where(i), layer.name, "clipped contraction"):
                grads.append(layer.book.clipped(params[i], tapes[i], scales[i]))
        return _like(params, grads)

    def moments(params, residuals, v):
        grads, sq = [None] * len(layers), [None] * len(layers)
        for i in reversed(range(len(layers))):
            with _blame(where(i), layers[i].name, "sq_grads"):
                grads[i], sq[i], v = layers[i].book.moments(params[i], residuals[i], v)
        return _like(params, grads), _like(params, sq), v

    def curvature(params, residuals, columns, kind):
        out = [None] * len(layers)
        for i in reversed(range(len(layers))):
            with _blame(where(i), layers[i].name, "curvature pass"):
                out[i], columns = layers[i].book.curvature(params[i], residuals[i], columns, kind)
        return _like(params, out), columns

    def tangent(params, residuals, dparams, dz):
        """The mirror of Algorithm 3: F of each child, from the first to the last."""
        for i, layer in enumerate(layers):
            with _blame(where(i), layer.name, "tangent pass"):
                named = f"{where(i)} ({layer.name})"
                dz = tangent_pass(layer.tangent, named, params[i], residuals[i], dparams[i], dz)
        return dz

    return _layer(
        name,
        init,
        forward,
        backward,
        BookKeeping(norms, clipped, moments, curvature),
        tangent=tangent,
    )


def residual(block: Layer) -> Layer:
    """The residual module Res(z) = z + block(z) (eq. 7.38).

    B[Res, z](v) = v + B[block, z](v): the identity path adds the incoming
    cotangent to the block's input cotangent. The identity has no params, so
    the per-example quantities are the block's (its tape is the block's).
    """
    block = _args.layer("residual", "block", block)
    name = f"residual({block.name})"

    def init(key, input_shape, dtype=jnp.float32):
        output_shape, params = block.init(key, input_shape, dtype)
        if tuple(output_shape) != tuple(input_shape):
            raise ValueError(
                f"{name}: the block maps shape {tuple(input_shape)} to "
                f"{tuple(output_shape)}; Res(z) = z + block(z) needs them equal"
            )
        return output_shape, params

    def forward(params, z):
        u, residuals = block.forward(params, z)
        return z + u, residuals

    def backward(params, residuals, v):
        grads, dz = block.backward(params, residuals, v)
        return grads, v + dz

    def norms(params, residuals, v):
        sq, dz, tape = block.book.norms(params, residuals, v)
        return sq, v + dz, tape

    def moments(params, residuals, v):
        grads, sq, dz = block.book.moments(params, residuals, v)
        return grads, sq, v + dz

    def curvature(params, residuals, columns, kind):
        out, dz = block.book.curvature(params, residuals, columns, kind)
        return out, columns + dz

    def tangent(params, residuals, dparams, dz):  # F[Res](t) = t + F[block](t)
        inner = tangent_pass(block.tangent, repr(block.name), params, residuals, dparams, dz)
        return dz if inner is None else inner if dz is None else dz + inner

    return _layer(
        name,
        init,
        forward,
        backward,
        BookKeeping(norms, block.book.clipped, moments, curvature),
        tangent=tangent,
    )


def remat(layer: Layer) -> Layer:
    """Store only the layer's input; recompute its residuals in the backward pass.

    The memory of the residuals inside ``layer`` (pre-activations, masks, the
    inputs of inner MMs) is traded for one more forward pass of ``layer``
    during the backward pass. The recomputation is fenced with
    ``jax.lax.optimization_barrier`` so the compiler cannot merge it with the
    first forward pass (which would store everything again).

    Book-Keeping: the norms pass recomputes the residuals as ``backward`` does;
    the tape is ``(z, v)``, the input remat stores anyway and its incoming
    cotangent, not the recomputed residuals. The clipped contraction
    recomputes the forward and the inner cotangents once more (fenced the
    same way) and contracts each inner layer's tape with its scales: remat
    keeps its memory bound, at the cost of that second recomputation.
    """
    layer = _args.layer("remat", "layer", layer)
    name = f"remat({layer.name})"

    def forward(params, z):
        u, _ = layer.forward(params, z)
        return u, z

    def recompute(params, z):
        """The residuals again; checked mode checked these values in the forward pass."""
        with at_site(quiet(site())):
            return layer.forward(params, z)[1]

    def backward(params, z, v):
        params, z, v = jax.lax.optimization_barrier((params, z, v))
        return layer.backward(params, recompute(params, z), v)

    def norms(params, z, v):
        params, z, v = jax.lax.optimization_barrier((params, z, v))
        sq, dz, _ = layer.book.norms(params, recompute(params, z), v)
        return sq, dz, (z, v)

    def clipped(params, tape, scales):
        params, (z, v), scales = jax.lax.optimization_barrier((params, tape, scales))
        _, _, inner = layer.book.norms(params, recompute(params, z), v)
        return layer.book.clipped(params, inner, scales)

    def moments(params, z, v):
        params, z, v = jax.lax.optimization_barrier((params, z, v))
        return layer.book.moments(params, recompute(params, z), v)

    def curvature(params, z, columns, kind):
        params, z, columns = jax.lax.optimization_barrier((params, z, columns))
        return layer.book.curvature(params, recompute(params, z), columns, kind)

    def tangent(params, z, dparams, dz):  # the residuals again, then the layer's F
        if dz is None and not jax.tree_util.tree_leaves(dparams):
            return None  # no tangent in: nothing to recompute
        return tangent_pass(
            layer.tangent, repr(layer.name), params, recompute(params, z), dparams, dz
        )

    return _layer(
        name,
        layer.init,
        forward,
        backward,
        BookKeeping(norms, clipped, moments, curvature),
        tangent=tangent,
    )


def _like(params, values: list):
    """The same container as params (a list stays a list: custom_vjp needs it)."""
    return list(values) if isinstance(params, list) else tuple(values)


@contextlib.contextmanager
def _blame(where: str, name: str, stage: str):
    """Prefix a ValueError/TypeError raised by a child's ``stage`` with its place."""
    try:
        yield
    except (ValueError, TypeError) as error:
        message = str(error)
        if not message.startswith(name):
            message = f"{name}: {message}"
        if stage != "forward" and not message.endswith(f"(in its {stage})"):
            message = f"{message} (in its {stage})"
        raise type(error)(f"{where} {message}") from None


def _check_init(where: str, name: str, input_shape: tuple, out) -> tuple:
    """A child's init result must be (output_shape, params), the shape a tuple of ints."""
    if (
        not isinstance(out, (tuple, list))
        or len(out) != 2
        or not isinstance(out[0], (tuple, list))
        or not all(isinstance(d, int) and d >= 0 for d in out[0])
    ):
        got = (
            f"a pair whose first entry is {out[0]!r}"
            if isinstance(out, (tuple, list)) and len(out) == 2
            else f"{type(out).__name__} of length {len(out)}"
            if isinstance(out, (tuple, list))
            else type(out).__name__
        )
        raise TypeError(
            f"{where} {name}: init(key, {tuple(input_shape)}, dtype) must return "
            f"(output_shape, params) with output_shape a tuple of ints (one example, no batch "
            f"axis), got {got}; see fnbp.make_layer"
        )
    return tuple(out[0]), out[1]


def _check_backward(where: str, name: str, params, out) -> tuple:
    """A child's backward result must be (dparams, dz), dparams shaped like params."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = (
            f"a tuple of {len(out)} values"
            if isinstance(out, (tuple, list))
            else type(out).__name__
        )
        raise TypeError(
            f"{where} {name}: backward must return the pair (dparams, dz), got {got}. A rule's "
            f"bwd returns one cotangent per argument (fnbp.rules.relu_bwd(res, v) -> (dz,)); "
            f"a Layer's backward returns (dparams, dz), e.g. `return (), relu_bwd(res, v)[0]` "
            f"for a layer without params; see fnbp.make_layer"
        )
    dparams, dz = out
    want = jax.tree_util.tree_structure(params)
    got = jax.tree_util.tree_structure(dparams)
    if want != got:
        raise TypeError(
            f"{where} {name}: backward returned dparams with structure {got}, but the params "
            f"have structure {want}; return (dparams, dz) with dparams shaped like params "
            f"(() for a layer without params)"
        )
    if not hasattr(dz, "shape") or not hasattr(dz, "dtype"):
        raise TypeError(
            f"{where} {name}: backward returned dz of type {type(dz).__name__}; return "
            f"(dparams, dz) with dz the cotangent of the layer's input, an array"
        )
    return dparams, dz
