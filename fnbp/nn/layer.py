"""Layers as pure functions over parameter pytrees, and the networks built from them.

A network is a composition of modules, J = M_k(M_{k-1}(... M_1(x))) (eq. 7.60).
Each module is a :class:`Layer`: an immutable record of pure functions

- ``init(key, input_shape, dtype) -> (output_shape, params)``: parameters for
  one example of shape ``input_shape`` (no batch axis): a tuple of positive
  ints, an int n taken as (n,) as NumPy takes a shape; ``key`` a PRNG key,
  ``dtype`` a floating dtype (all three checked for every layer);
- ``forward(params, z) -> (u, residuals)``: the forward pass that stores what
  the backward function needs (Algorithm 3, forward pass);
- ``backward(params, residuals, v) -> (dparams, dz)``: the backward function
  B[M, z] for the parameters and the input, built from the hand-written rules;
- ``apply(params, z) -> u``: the forward alone, itself a ``jax.custom_vjp``
  whose rule is ``forward``/``backward``, so ``jax.grad`` in user code gets
  the same hand-written gradients;
- ``sq_norms(params, residuals, v) -> (sq, dz)`` and
  ``sq_grads(params, residuals, v) -> sq_grads``: per-example quantities of
  the parameter gradients, per parameter leaf, from the batched cotangent
  (see "Per-example quantities" below);
- ``book``: the :class:`BookKeeping` passes the per-example engine
  (:mod:`fnbp.per_example`) runs, derived from the above.

Leading axes of ``z`` beyond the example shape are example axes (eq. 7.84).

Every layer's ``forward`` and ``apply`` are wrapped once, here, whoever made
the layer (:func:`make_layer`, the combinators, a precision policy): a model
called by the user converts its input (a nested list of numbers) or refuses
it, and under :func:`fnbp.checked` each layer checks for NaN and infinity the
model's input x, its own params (named by their path in the model's params,
``params[2]['W']``) and its output, naming itself by its place in the model
(``mlp[2] linear(10)``). checkify keeps the first failing check, so the
first non-finite value is reported where it enters. Unchecked, nothing is
added to the program.
:func:`serial` composes layers and its backward is Algorithm 3 over its
children; :func:`residual` is Res(z) = z + block(z) (eq. 7.38).

Per-example quantities (Book-Keeping, Bu et al. 2023). With the batch's first
axis holding n examples, example i's gradient of a parameter P is
g_i = dJ^(i)/dP, and in a batched backward pass the cotangent ``v`` of the
layer's output holds every example's v_i = dJ^(i)/du side by side (further
leading axes of v are positions inside example i, summed into g_i). For MM,
g_i = v_i z_i^T (eq. 7.65). A layer with parameters states, per leaf P:

- ``sq_norms``: ``||g_i(P)||^2`` for each i, shape (n,), without building the
  g_i where it can (MM: ``||v_i||^2 ||z_i||^2``);
- ``sq_grads``: ``sum_i g_i(P) (.) g_i(P)``, shaped like P (MM:
  ``(V (.) V)^T (Z (.) Z)``).

From these the engine needs one forward and one backward pass. During the
backward pass each layer returns its per-leaf squared norms, its dz, and a
*tape*: its residuals and its incoming cotangent v. After the pass the clipped
gradient sum_i s_i g_i of each layer is one contraction with the per-example
scales folded into v: the backward is linear in v and each example's part is
its own, so sum_i s_i g_i(P) = dP of ``backward(params, residuals, s (.) v)``
(for MM, V^T diag(s) Z: one dot per weight). Only dparams is kept; under
``jax.jit`` the unused dz is dead code. Parameter-free layers (activations,
pooling, Flatten) need nothing: they pass dz on and keep no tape.

Mixed ghost clipping (Bu et al.). Where a layer's ``sq_norms`` materializes
the g_i anyway (its cost rule: a convolution whose 2 T^2 exceeds the filter
gradient's size), its optional ``grads`` hook puts them in the tape, and the
clipped gradient is ``sum_i s_i g_i``, a contraction over the n examples
alone, instead of a second weight-gradient pass. Likewise ``moments`` gives
``(sum_i g_i, sum_i g_i (.) g_i)`` where ``sq_grads`` materializes, and the
moments pass takes the mean gradient from it (see :func:`make_layer`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.custom_derivatives import SymbolicZero

from fnbp.checking import check_finite, is_checking
from fnbp.nn import _args
from fnbp.rules._per_example import example_sum as _example_sum
from fnbp.rules._per_example import squares as _squares
from fnbp.rules._rule import in_forward_mode

Shape = tuple[int, ...]
Params = Any
Residuals = Any
Tape = Any


class MissingRuleError(NotImplementedError):
    """A layer with parameters has no rule for a per-example (or curvature) quantity.

    Raised while tracing ``sq_norms``/``sq_grads`` (or the :class:`BookKeeping`
    passes); :mod:`fnbp.per_example` catches it and falls back to
    materializing the per-example gradients, with a
    ``fnbp.PerExampleFallbackWarning``.

    Attributes:
      layer: the layer's name.
      hook: ``"sq_norms"`` or ``"sq_grads"``.
    """

    def __init__(self, layer: str, hook: str):
        self.layer, self.hook = layer, hook
        super().__init__(
            f"{layer}: this layer has parameters but no {hook} rule; give it one with "
            f"fnbp.make_layer(name, init, forward, backward, {hook}=...) (see make_layer)"
        )


class KroneckerFactors(NamedTuple):
    """K-FAC's two factors of one layer's weight: its GGN block is approximated by B (x) A.

    For a weight W of shape (out, in) (a convolution's filters as the
    (C2, k... C) matrix ``w.reshape(-1, C2).T``) with the bias as its last
    column when the layer has one, and vec row-major (``W.reshape(-1)``):

    - ``A``: (in [+ 1], in [+ 1]), ``(1/(n T)) sum_{i,t} z~ z~^T`` of the
      layer's inputs (z~ = [z; 1] with a bias), from the forward pass;
    - ``B``: (out, out), ``sum_c sum_{i,t} b b^T`` of the loss Hessian's
      columns pulled back to the layer's output (the 1/n of the mean loss
      inside).

    See :func:`fnbp.kfac_factors`.
    """

    A: Array
    B: Array


CURVATURE = ("diag", "kfac")
"""The quantities of the curvature pass: the GGN's diagonal, K-FAC's factors."""


class BookKeeping(NamedTuple):
    """The passes of the per-example engine, derived for every layer by :func:`make_layer`.

    - ``norms(params, residuals, v) -> (sq, dz, tape)``: the backward pass:
      ``sq`` a pytree like params of (n,) per-example squared norms, ``dz``
      as ``backward``'s, ``tape`` what ``clipped`` needs (for a leaf layer
      its residuals and v; for :func:`fnbp.serial` the tuple of its
      children's tapes; ``None`` for a layer without params).
    - ``clipped(params, tape, scales) -> dparams``: with ``scales`` a pytree
      like params of (n,) arrays s, each leaf P gets sum_i s_i g_i(P).
    - ``moments(params, residuals, v) -> (dparams, sq_grads, dz)``: the
      backward pass that also returns ``sum_i g_i (.) g_i`` per leaf.
    - ``curvature(params, residuals, columns, kind) -> (out, dcolumns)``:
      the backward pass of C columns at once, ``columns`` of shape
      (C, *u.shape) (the loss Hessian's factor pulled back to the layer's
      output, :mod:`fnbp.curvature`), ``dcolumns`` the same for its input
      (B applied to each column, one ``jax.vmap``). ``kind`` ``"diag"``:
      ``out`` a pytree like params, ``sum_{c,i} g_ic (.) g_ic`` per leaf;
      ``"kfac"``: a :class:`KroneckerFactors` for a layer with a ``kfac``
      rule, ``None`` for one with params and none; ``()`` without params.
    """

    norms: Callable[[Params, Residuals, Array], tuple[Params, Array, Tape]]
    clipped: Callable[[Params, Tape, Params], Params]
    moments: Callable[[Params, Residuals, Array], tuple[Params, Params, Array]]
    curvature: Callable[[Params, Residuals, Array, str], tuple[Any, Array]]


class Layer(NamedTuple):
    """A module M of the notes as a record of pure functions (see the module doc)."""

    name: str
    init: Callable[..., tuple[Shape, Params]]
    forward: Callable[[Params, Array], tuple[Array, Residuals]]
    backward: Callable[[Params, Residuals, Array], tuple[Params, Array]]
    apply: Callable[[Params, Array], Array]
    sq_norms: Callable[[Params, Residuals, Array], tuple[Params, Array]]
    sq_grads: Callable[[Params, Residuals, Array], Params]
    book: BookKeeping
    tangent: Callable[[Params, Residuals, Params, Array | None], Array | None] | None = None

    def __repr__(self) -> str:
        return f"Layer({self.name})"


def _make_apply(name, forward, backward, tangent):
    """``apply``: a custom_vjp whose rule is the layer's own forward/backward.

    A model called by the user gets its input converted (or refused) first,
    as ``forward`` does, since the custom_vjp takes only arrays. While
    :func:`fnbp.jvp` traces (forward mode), ``apply`` is instead a custom_jvp
    whose rule is ``forward`` and the layer's forward function ``tangent``:
    the forward pass stores the residuals and the tangent pass chains F,
    the mirror of Algorithm 3.
    """

    def apply(params, z):
        if site() is None:
            z = _args.model_input(name, z)
        if not in_forward_mode():
            return rule(params, z)
        if tangent is None:
            raise no_forward_function(repr(name))
        return forward_rule(params, z)

    @jax.custom_vjp
    def rule(params, z):
        return forward(params, z)[0]

    def apply_fwd(params, z):
        u, residuals = forward(params, z)
        return u, (params, residuals)

    def apply_bwd(saved, v):
        params, residuals = saved
        return backward(params, residuals, v)

    rule.defvjp(apply_fwd, apply_bwd)

    @jax.custom_jvp
    def forward_rule(params, z):
        return forward(params, z)[0]

    def forward_rule_jvp(primals, tangents):
        params, z = primals
        dparams, dz = _none_for_zeros(tangents)  # no product with a zero tangent
        u, residuals = forward(params, z)
        du = tangent_pass(tangent, repr(name), params, residuals, dparams, dz)
        return u, jnp.zeros_like(u) if du is None else du

    forward_rule.defjvp(forward_rule_jvp, symbolic_zeros=True)
    return apply


def no_forward_function(named: str, fn: str = "fnbp.jvp") -> NotImplementedError:
    """The refusal of forward mode for a layer without a forward function, naming it."""
    return NotImplementedError(
        f"{fn}: layer {named} has no forward function; give it one with "
        f"fnbp.make_layer(name, init, forward, backward, tangent=...)"
    )


def tangent_pass(tangent, named: str, params, residuals, dparams, dz):
    """A layer's forward function ``tangent`` applied, for every layer and combinator alike.

    ``None`` (a zero tangent out) without calling it where no tangent comes in
    (``dz`` and every leaf of ``dparams`` ``None``); a layer without a forward
    function is refused only where one is needed (``named`` names it).
    """
    if dz is None and not jax.tree_util.tree_leaves(dparams):
        return None
    if tangent is None:
        raise no_forward_function(named)
    return tangent(params, residuals, dparams, dz)


def _none_for_zeros(tangents):
    """JAX's symbolic zero tangents as ``None`` (the layers' forward functions skip them)."""
    return jax.tree_util.tree_map(
        lambda t: None if isinstance(t, SymbolicZero) else t,
        tangents,
        is_leaf=lambda t: isinstance(t, SymbolicZero),
    )


def make_layer(
    name: str,
    init: Callable[..., tuple[Shape, Params]],
    forward: Callable[[Params, Array], tuple[Array, Residuals]],
    backward: Callable[[Params, Residuals, Array], tuple[Params, Array]],
    sq_norms: Callable[[Params, Residuals, Array], tuple[Params, Array]] | None = None,
    sq_grads: Callable[[Params, Residuals, Array], Params] | None = None,
    grads: Callable[[Params, Residuals, Array], Params] | None = None,
    moments: Callable[[Params, Residuals, Array], Params] | None = None,
    *,
    diag_ggn: Callable[[Params, Residuals, Array], Params] | None = None,
    kfac: Callable[[Params, Residuals, Array], tuple[Array, Array]] | None = None,
    tangent: Callable[[Params, Residuals, Params, Array | None], Array | None] | None = None,
) -> Layer:
    """Build a :class:`Layer` from its init, forward and backward functions.

    Use this for your own modules: write ``forward`` (returning the output and
    the residuals) and ``backward`` (the backward function B), and the layer
    composes with fnbp's in :func:`fnbp.serial`, :func:`fnbp.residual` and
    :func:`fnbp.backprop`. For a rule already written as ``jax.custom_vjp``
    functions ``(f, f_fwd, f_bwd)``, :func:`layer_from_rule` does this for you.

    The per-example hooks (optional; see the module doc). For a batch of n
    examples along v's first axis, g_i(P) = dJ^(i)/dP is example i's gradient
    of the parameter leaf P, e.g. g_i(W) = v_i z_i^T for MM (eq. 7.65):

    - ``sq_norms(params, residuals, v) -> (sq, dz)``: ``sq`` a pytree like
      ``params`` whose leaf for P is ``||g_i(P)||_F^2`` for each i, shape
      (n,), dtype at least float32; ``dz`` equal to ``backward``'s. Used by
      :func:`fnbp.per_example_grad_norms` and :func:`fnbp.clipped_grads`.
    - ``sq_grads(params, residuals, v) -> sq``: a pytree like ``params``, the
      leaf for P being ``sum_i g_i(P) (.) g_i(P)`` (BackPACK's
      SumGradSquared), dtype at least float32. Used by
      :func:`fnbp.grad_moments`.

    Mixed ghost clipping (Bu et al.): where a hook builds the per-example
    gradients anyway (a convolution whose positions outnumber its filter
    gradient's size, ``2 T^2 > D``; MM on long sequences), two optional hooks
    hand them over so that nothing is computed twice:

    - ``grads(params, residuals, v) -> g``: a pytree like ``params`` whose
      leaf for P is the (n, *P.shape) stack of the g_i(P) that ``sq_norms``
      materializes, or ``None`` where it does not (the Gram form). For such
      a leaf the engine takes ``||g_i||^2`` from g and the clipped sum as one
      contraction ``sum_i s_i g_i(P)`` (no second weight-gradient pass); the
      g_i travel in the tape until the scales are known.
    - ``moments(params, residuals, v) -> m``: a pytree like ``params`` whose
      leaf for P is the pair ``(sum_i g_i(P), sum_i g_i(P) (.) g_i(P))``,
      both shaped like P, where ``sq_grads`` materializes the g_i, or
      ``None``. For such a leaf :func:`fnbp.grad_moments` takes the gradient
      and the second moment from the pair; the backward's own contraction for
      that leaf is then dead code under ``jax.jit``.

    Both must agree with ``sq_norms``/``sq_grads`` and ``backward`` (the same
    g_i); they are optimizations, never needed for correctness.

    Curvature (:func:`fnbp.diag_ggn`, :func:`fnbp.kfac_factors`). The loss
    Hessian's C columns travel back as one batched cotangent ``columns`` of
    shape (C, n, ...); ``backward`` is applied to each (``jax.vmap``). The
    GGN's diagonal needs nothing more than ``sq_grads`` (column by column,
    summed); two optional keyword hooks:

    - ``diag_ggn(params, residuals, columns) -> d``: a pytree like params,
      ``sum_{c,i} g_ic (.) g_ic`` per leaf, where a layer can do better than
      C calls of ``sq_grads`` (MM on vectors: the columns' squares summed
      first, one contraction whatever C).
    - ``kfac(params, residuals, columns) -> (A, B)``: the Kronecker factors
      of the layer's weight (see :class:`KroneckerFactors`); a layer with
      params and no ``kfac`` hook has no factors (``None`` in
      :func:`fnbp.kfac_factors`' result).

    A layer without params needs neither. A layer with params but without a
    hook still works everywhere: the per-example functions then materialize
    every example's gradient (``jax.vmap`` of the per-example backprop) and
    say so once with a ``fnbp.PerExampleFallbackWarning``. The clipped
    gradient needs no hook of its own: it is ``backward`` called with the
    per-example scales folded into v, keeping only dparams.

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
      sq_norms: optional, as above.
      sq_grads: optional, as above.
      grads: optional, as above (needs ``sq_norms``).
      moments: optional, as above (needs ``sq_grads``).
      diag_ggn: optional, keyword only, as above.
      kfac: optional, keyword only, as above.
      tangent: optional, keyword only: the layer's forward function F,
        ``tangent(params, residuals, dparams, dz) -> du``, the change of the
        output for a change ``dparams`` of the params (a pytree like params)
        and ``dz`` of the input, from ``forward``'s residuals; the adjoint of
        ``backward``. ``dz`` or a leaf of ``dparams`` is ``None`` where its
        tangent is zero (skip its term), and ``du`` may be ``None`` when all
        are. :func:`fnbp.jvp` uses it; without it the layer has no forward mode.

    Returns:
      The :class:`Layer`; its ``apply`` calls a ``jax.custom_vjp`` whose rule
      is ``forward``/``backward``; ``sq_norms``/``sq_grads`` are always callable
      (for a layer with params and no hook they raise :class:`MissingRuleError`).
      Its ``init`` and ``forward`` check what every layer's do (see the
      module doc): checked mode covers your layer with nothing written.

    Raises:
      TypeError: ``name`` not a non-empty str, ``init``/``forward``/
        ``backward`` not callable, a hook given that is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"make_layer: name must be a non-empty str (shown in errors), got {name!r}")
    for arg, value in (
        ("init", init),
        ("forward", forward),
        ("backward", backward),
        ("sq_norms", sq_norms),
        ("sq_grads", sq_grads),
        ("grads", grads),
        ("moments", moments),
        ("diag_ggn", diag_ggn),
        ("kfac", kfac),
        ("tangent", tangent),
    ):
        if not callable(value) and (value is not None or arg in ("init", "forward", "backward")):
            raise TypeError(
                f"make_layer: {arg} must be a function (see fnbp.make_layer for "
                f"its signature), got {type(value).__name__}"
            )
    return _layer(
        name,
        init,
        forward,
        backward,
        _leaf_book(name, backward, sq_norms, sq_grads, grads, moments, diag_ggn, kfac),
        leaf=True,
        tangent=tangent,
    )


def _layer(
    name, init, forward, backward, book: BookKeeping, *, leaf: bool = False, tangent=None
) -> Layer:
    """The Layer record of a layer whose Book-Keeping passes are given (combinators).

    ``leaf``: the layer's params are its own (:func:`make_layer`), so checked
    mode checks them here; a combinator's (``leaf=False``) are its children's,
    checked by them.
    """
    forward = _checked_forward(name, forward, leaf)
    init = _checked_init(name, init)

    def sq_norms(params, residuals, v):
        sq, dz, _ = book.norms(params, residuals, v)
        return sq, dz

    def sq_grads(params, residuals, v):
        return book.moments(params, residuals, v)[1]

    return Layer(
        name,
        init,
        forward,
        backward,
        _make_apply(name, forward, backward, tangent),
        sq_norms,
        sq_grads,
        book,
        tangent,
    )


# --- where a layer sits: the checks of init and of checked mode --------------------------


class Site(NamedTuple):
    """Where a layer is called, for its messages (see :func:`_checked_forward`).

    Attributes:
      prefix: what precedes the layer's name in its messages (``"mlp[2] "``).
      path: where its params sit in the model's params (``"params[2]"``), or
        None where unknown (a layer called by a user's layer).
      checked_input: its input was checked by the layer that made it.
      quiet: a recomputation (:func:`fnbp.remat`'s backward): no checks.
    """

    prefix: str
    path: str | None
    checked_input: bool = False
    quiet: bool = False


TOP = Site("", "params")
"""The site of a model called by the user: its input is the model's input x."""

_SITE: contextvars.ContextVar[Site | None] = contextvars.ContextVar("fnbp_layer_site", default=None)


def site() -> Site | None:
    """The site of the layer being traced now; None for a model called by the user."""
    return _SITE.get()


@contextlib.contextmanager
def at_site(where: Site | None) -> Iterator[None]:
    """Trace the layers called inside at ``where`` (combinators set their children's)."""
    token = _SITE.set(where)
    try:
        yield
    finally:
        _SITE.reset(token)


def quiet(where: Site | None) -> Site:
    """``where``, for a recomputation: its values were checked when first computed."""
    return (where or TOP)._replace(quiet=True)


_INPUT_FIX = (
    "clean the input or find where the non-finite values come from "
    "(jax.config.update('jax_debug_nans', True))"
)
_PARAMS_FIX = (
    "the parameters were not finite before this call: a training step that "
    "diverged (lower the learning rate, clip the gradients), an init or a "
    "checkpoint that holds them; find the step that made them"
)
_OUTPUT_FIX = (
    "its input and parameters are finite, so the layer itself made it (an "
    "overflow of its dtype, a 0/0); compute in a wider dtype (fnbp.Precision) or "
    "scale the input, and find the operation with "
    "jax.config.update('jax_debug_nans', True)"
)


def check_input(name: str, x: Any) -> None:
    """Checked mode: the model's input x is finite, the first bad entry named."""
    check_finite(name, "x (the model's input)", x, fix=_INPUT_FIX, locate=True)


def _checked_forward(name: str, forward, leaf: bool):
    """``forward`` with the checks every layer makes, at the one place they are made.

    A model called by the user (no enclosing layer) converts its input x to an
    array (a nested list of numbers is taken; anything else refused). Under
    :func:`fnbp.checked` each layer adds run-time checks, so that the first
    non-finite value is reported where it enters, naming the layer by its
    place in the model (``mlp[2] linear(10)``):

    - the model's input x, and a layer's input that no other layer made;
    - a leaf layer's params, each leaf by its path in the model's params
      (``params[2]['W']``);
    - every layer's output, which can only then be non-finite if the layer
      made it so (an overflow).

    checkify keeps the first failing check in program order, which is the
    order above. Outside :func:`fnbp.checked` nothing is added to the
    program: the checks cost nothing unchecked.
    """

    def checked_forward(params, z):
        where = site()
        if where is None:
            z = _args.model_input(name, z)
        if not is_checking() or (where is not None and where.quiet):
            if not leaf:
                return forward(params, z)
            with at_site(
                Site(
                    f"{(where or TOP).prefix}{name} ", None, quiet=where is not None and where.quiet
                )
            ):
                return forward(params, z)
        at = where or TOP
        place = at.prefix + name
        if where is None:
            check_input(place, z)
        elif not at.checked_input:
            check_finite(place, "z", z, fix=_INPUT_FIX, locate=True)
        if leaf:
            base = at.path or "params"
            for key_path, value in jax.tree_util.tree_leaves_with_path(params):
                if hasattr(value, "dtype") or isinstance(value, (int, float, complex)):
                    check_finite(
                        place,
                        base + jax.tree_util.keystr(key_path),
                        value,
                        fix=_PARAMS_FIX,
                        locate=True,
                    )
            with at_site(Site(place + " ", None)):
                u, residuals = forward(params, z)
        else:
            u, residuals = forward(params, z)
        for key_path, value in jax.tree_util.tree_leaves_with_path(u):
            if hasattr(value, "dtype"):
                check_finite(
                    place,
                    "its output" + jax.tree_util.keystr(key_path),
                    value,
                    fix=_OUTPUT_FIX,
                    locate=True,
                )
        return u, residuals

    return checked_forward


_DEFAULT_DTYPE = object()


def _checked_init(name: str, init):
    """``init`` with its arguments checked: a PRNG key, one example's shape, a float dtype.

    An int input shape n is taken as (n,) (as NumPy takes a shape). The dtype
    is passed on only when given, so an init with a default of its own keeps it.
    """

    def checked_init(key, input_shape, dtype=_DEFAULT_DTYPE):
        key = _args.prng_key(name, key)
        shape = _args.input_shape(name, input_shape)
        if dtype is _DEFAULT_DTYPE:
            return init(key, shape)
        if dtype is not None:
            _args.float_dtype(name, dtype)
        return init(key, shape, dtype)

    return checked_init


def has_params(params: Params) -> bool:
    """Whether the pytree ``params`` has any leaf (a layer without params has ``()``)."""
    return bool(jax.tree_util.tree_leaves(params))


def _leaf_book(
    name: str, backward, sq_norms, sq_grads, grads=None, moments=None, diag_ggn=None, kfac=None
) -> BookKeeping:
    """The Book-Keeping passes of a layer from its backward and its hooks.

    The tape of a leaf layer is ``(residuals, v, g)``, g the per-leaf list of
    the per-example gradients its ``grads`` hook handed over (``None`` per
    leaf, or ``None`` without the hook).
    """

    def norms(params, residuals, v):
        if not has_params(params):
            return params, backward(params, residuals, v)[1], None
        if sq_norms is None:
            raise MissingRuleError(name, "sq_norms")
        g = _per_leaf(
            name, "grads", grads, params, residuals, v, lambda p: (v.shape[0],) + jnp.shape(p)
        )
        if g is not None and all(g_p is not None for g_p in g):
            # Every leaf's g_i are handed over: the norms come from them alone.
            sq_leaves, dz = [None] * len(g), backward(params, residuals, v)[1]
        else:
            out = sq_norms(params, residuals, v)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError(
                    f"{name}: sq_norms must return the pair (sq, dz), got "
                    f"{type(out).__name__}; see fnbp.make_layer"
                )
            sq, dz = out
            _check_per_leaf(name, "sq_norms", params, sq, lambda p: (v.shape[0],))
            if g is None:
                return sq, dz, (residuals, v, None)
            sq_leaves = jax.tree_util.tree_leaves(sq)
        sq = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params),
            [q if g_p is None else _squares(g_p)[0] for q, g_p in zip(sq_leaves, g)],
        )
        return sq, dz, (residuals, v, g)

    def clipped(params, tape, scales):
        if not has_params(params):
            return params
        residuals, v, g = tape
        if g is None:
            return scaled_backward(backward, params, residuals, v, scales)
        treedef: jax.tree_util.PyTreeDef
        p_leaves, treedef = jax.tree_util.tree_flatten(params)
        s_leaves = jax.tree_util.tree_leaves(scales)
        rest = (  # the leaves without per-example gradients, by backward
            jax.tree_util.tree_leaves(scaled_backward(backward, params, residuals, v, scales))
            if any(g_p is None for g_p in g)
            else []
        )
        return treedef.unflatten(
            [
                rest[i]
                if g_p is None
                else _example_sum(g_p, s.astype(g_p.dtype)).astype(jnp.result_type(p))
                for i, (p, s, g_p) in enumerate(zip(p_leaves, s_leaves, g))
            ]
        )

    def moments_pass(params, residuals, v):
        dparams, dz = backward(params, residuals, v)
        if not has_params(params):
            return dparams, params, dz
        if sq_grads is None:
            raise MissingRuleError(name, "sq_grads")
        m = _per_leaf(name, "moments", moments, params, residuals, v, jnp.shape, pairs=True)
        if m is not None and all(m_p is not None for m_p in m):
            # Every leaf's (sum_i g_i, sum_i g_i (.) g_i) is handed over: no sq_grads call.
            sq_leaves = [None] * len(m)
        else:
            sq = sq_grads(params, residuals, v)
            _check_per_leaf(name, "sq_grads", params, sq, jnp.shape)
            if m is None:
                return dparams, sq, dz
            sq_leaves = jax.tree_util.tree_leaves(sq)
        treedef: jax.tree_util.PyTreeDef
        d_leaves, treedef = jax.tree_util.tree_flatten(dparams)
        sq = treedef.unflatten([q if m_p is None else m_p[1] for q, m_p in zip(sq_leaves, m)])
        dparams = treedef.unflatten(
            [d if m_p is None else m_p[0].astype(d.dtype) for d, m_p in zip(d_leaves, m)]
        )
        return dparams, sq, dz

    def curvature(params, residuals, columns, kind):
        dz = jax.vmap(lambda v: backward(params, residuals, v)[1])(columns)
        if not has_params(params):
            return params, dz
        if kind == "kfac":
            if kfac is None:
                return None, dz
            return _kronecker(name, kfac(params, residuals, columns)), dz
        if diag_ggn is not None:
            diag = diag_ggn(params, residuals, columns)
            _check_per_leaf(name, "diag_ggn", params, diag, jnp.shape)
            return diag, dz
        if sq_grads is None:
            raise MissingRuleError(name, "sq_grads")
        per_column = jax.vmap(lambda v: sq_grads(params, residuals, v))(columns)
        _check_per_leaf(
            name, "sq_grads", params, per_column, lambda p: (columns.shape[0],) + jnp.shape(p)
        )
        return jax.tree_util.tree_map(lambda q: jnp.sum(q, axis=0), per_column), dz

    return BookKeeping(norms, clipped, moments_pass, curvature)


def _kronecker(name: str, out) -> KroneckerFactors:
    """A ``kfac`` hook's result as :class:`KroneckerFactors`, its shapes checked."""
    if (
        not isinstance(out, (tuple, list))
        or len(out) != 2
        or any(jnp.ndim(f) != 2 or jnp.shape(f)[0] != jnp.shape(f)[1] for f in out)
    ):
        raise TypeError(
            f"{name}: kfac must return the pair (A, B) of square matrices (A over the "
            f"layer's inputs, B over its outputs), got {type(out).__name__} {out!r:.80}; "
            f"see fnbp.make_layer"
        )
    return KroneckerFactors(*out)


def _per_leaf(
    name: str, hook: str, fn, params, residuals, v, shape_of, pairs: bool = False
) -> list | None:
    """The ``grads``/``moments`` hook's result as one entry per leaf of params (or None)."""
    if fn is None:
        return None
    out = fn(params, residuals, v)
    treedef: jax.tree_util.PyTreeDef = jax.tree_util.tree_structure(params)
    what = (
        "a pair (sum_i g_i, sum_i g_i * g_i) shaped like the leaf"
        if pairs
        else "the (n, *leaf.shape) per-example gradients"
    )
    try:
        entries = treedef.flatten_up_to(out)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name}: {hook} returned {type(out).__name__} {out!r:.80}, but the "
            f"params have structure {treedef}; return a pytree like params with "
            f"{what} or None per leaf (see fnbp.make_layer)"
        ) from None
    for p, entry in zip(jax.tree_util.tree_leaves(params), entries):
        parts = entry if pairs and isinstance(entry, (tuple, list)) else (entry,)
        if entry is None:
            continue
        if (pairs and len(parts) != 2) or any(jnp.shape(e) != tuple(shape_of(p)) for e in parts):
            raise TypeError(
                f"{name}: {hook} returned {what.split(' shaped')[0]} of shapes "
                f"{[jnp.shape(e) for e in parts]} for a parameter of shape "
                f"{jnp.shape(p)}; expected {what} ({tuple(shape_of(p))}) or None "
                f"(see fnbp.make_layer)"
            )
    return entries


def _check_per_leaf(name: str, hook: str, params, sq, shape_of) -> None:
    """A hook's result must be a pytree like params with one array of the stated shape per leaf."""
    want: jax.tree_util.PyTreeDef = jax.tree_util.tree_structure(params)
    got: jax.tree_util.PyTreeDef = jax.tree_util.tree_structure(sq)
    what = (
        "one (n,) array of per-example squared norms"
        if hook == "sq_norms"
        else "one array shaped like the leaf"
    )
    if want != got:
        raise TypeError(
            f"{name}: {hook} returned {got}, but the params have structure {want}; "
            f"return a pytree like params with {what} per leaf (see fnbp.make_layer)"
        )
    for p, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(sq)):
        if jnp.shape(s) != tuple(shape_of(p)):
            raise TypeError(
                f"{name}: {hook} returned a leaf of shape {jnp.shape(s)} for a "
                f"parameter of shape {jnp.shape(p)}; expected {tuple(shape_of(p))}, "
                f"{what} (see fnbp.make_layer)"
            )


def scaled_backward(backward, params, residuals, v, scales) -> Params:
    """sum_i s_i g_i(P) for every leaf P: ``backward`` with s folded into v, dparams kept.

    The backward function is linear in v and example i's part of a parameter
    cotangent is its own (g_i depends on v_i alone), so scaling v_i by s_i
    scales g_i by s_i: for MM, dW = V^T diag(s) Z, one dot. Leaves that share
    one scale array (flat clipping) share one call; a leaf with a scale of its
    own (per-parameter clipping) gets a call whose other outputs are dead code
    under ``jax.jit``.

    Args:
      backward: the layer's ``backward(params, residuals, v) -> (dparams, dz)``.
      params, residuals, v: as for ``backward``; v's first axis holds the n examples.
      scales: a pytree like params whose leaves are (n,) arrays.
    """
    treedef: jax.tree_util.PyTreeDef
    leaves, treedef = jax.tree_util.tree_flatten(scales)
    out = [None] * len(leaves)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(leaves):
        groups.setdefault(id(s), []).append(i)
    for members in groups.values():
        s = leaves[members[0]]
        scaled = (v * jnp.reshape(s, jnp.shape(s) + (1,) * (v.ndim - 1))).astype(v.dtype)
        dparams = jax.tree_util.tree_leaves(backward(params, residuals, scaled)[0])
        for i in members:
            out[i] = dparams[i]
    return treedef.unflatten(out)


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
    f_jvp: Callable | None = None,
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
      f_jvp: optional, the rule's forward function F, as fnbp's rules declare
        theirs: ``f_jvp(residuals, (t_z, t_p1, ..., t_pk)) -> t_u``, a
        tangent ``None`` where it is zero; it gives the layer its forward
        mode (:func:`fnbp.jvp`).

    Returns:
      A :class:`Layer`; use it in :func:`fnbp.serial` like fnbp's own.

    Raises:
      TypeError: ``f_fwd``/``f_bwd``/``init`` not callable (at construction),
        or ``f_bwd`` returning other than one cotangent per argument (when the
        backward pass is traced); the message names the layer.
    """
    for arg, value in (("f_fwd", f_fwd), ("f_bwd", f_bwd)):
        if not callable(value):
            raise TypeError(
                f"layer_from_rule: {arg} must be the rule's {arg[2:]} function "
                f"(as passed to f.defvjp), got {type(value).__name__}"
            )
    if f_jvp is not None and not callable(f_jvp):
        raise TypeError(
            f"layer_from_rule: f_jvp must be the rule's forward function "
            f"f_jvp(residuals, tangents) -> tangent, got {type(f_jvp).__name__}"
        )
    if init is not None and not callable(init):
        raise TypeError(
            f"layer_from_rule: init must be a function "
            f"init(key, input_shape, dtype) -> (output_shape, params), got "
            f"{type(init).__name__}; pass init=None for a parameter-free rule"
        )
    name = name or getattr(f, "__name__", None) or "rule"

    def init_fn(key, input_shape, dtype=jnp.float32):
        if init is None:
            return _no_params(key, input_shape, dtype)
        output_shape, params = init(key, input_shape, dtype)
        if not isinstance(params, tuple):
            raise TypeError(
                f"{name}: init must return (output_shape, params) with params the "
                f"tuple (p_1, ..., p_k) of f's arguments after z; got params of "
                f"type {type(params).__name__}"
            )
        return tuple(output_shape), params

    def forward(params, z):
        return f_fwd(z, *params)

    def backward(params, residuals, v):
        cotangents = f_bwd(residuals, v)
        expected = 1 + len(params)
        if not isinstance(cotangents, (tuple, list)) or len(cotangents) != expected:
            got = (
                f"{len(cotangents)} values"
                if isinstance(cotangents, (tuple, list))
                else f"a {type(cotangents).__name__}"
            )
            raise TypeError(
                f"{name}: f_bwd must return a tuple of {expected} cotangents, one "
                f"per argument of f (z and {len(params)} params), got {got}"
            )
        return tuple(cotangents[1:]), cotangents[0]

    tangent = None if f_jvp is None else _rule_tangent(f_jvp)
    return make_layer(name, init_fn, forward, backward, tangent=tangent)


def _rule_tangent(f_jvp: Callable) -> Callable:
    """The layer's forward function from a rule's: the tangents (dz, *dparams) in order."""

    def tangent(params, residuals, dparams, dz):
        return f_jvp(residuals, (dz, *dparams))

    return tangent
