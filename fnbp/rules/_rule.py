"""One record per rule, and the one helper that declares it.

A rule of fnbp is a module M of the notes with its hand-written backward
function B[M, z]. It is declared once, beside its code, by :func:`declare`::

    def relu_fwd(z):                      # (output, residuals)
        return jnp.maximum(z, 0), ReluResiduals(z > 0)

    def relu_bwd(res, v):                 # one cotangent per array argument
        return (jnp.where(res.mask, v, 0),)

    def relu(z):                          # the public, validating function
        return RELU.apply(_float_input("relu", z))

    def relu_jvp(res, t):                 # the forward function F[relu, z](t)
        return jnp.where(res.mask, t[0], 0)

    RELU = declare(relu, relu_fwd, relu_bwd, jvp=relu_jvp, reference=..., examples=...,
                   equations=("7.11", "7.69"), kink="relu'(0) = 0",
                   family="activation", layer=LayerSpec(), init="he")

:func:`declare` builds the ``jax.custom_vjp`` in one uniform way (and, from
``fwd`` and the forward function ``jvp``, the rule's ``jax.custom_jvp``) and
registers the :class:`Rule` record. Everything else is derived from the registry: the
top-level names, ``fnbp.rules.relu_fwd``/``relu_bwd``, the catalog that
``fnbp check`` runs, the layers and activation names of ``fnbp.mlp``, and the
rule tests.

The calling convention of ``fwd`` and ``bwd``: array arguments (inputs,
parameters, array-valued settings such as ``eps`` or ``gamma``) are
positional; static settings (``stride``, ``approximate``) are keyword
arguments, passed to both ``fwd(*arrays, **settings)`` and
``bwd(res, v, **settings)``. ``bwd`` returns exactly one cotangent per
positional argument (``None`` for integer labels and absent arguments).

The forward function is the mirror of the backward one: for M(a_1, ..., a_k),
B[M](v) = (J_1^T v, ..., J_k^T v) and F[M](t_1, ..., t_k) = sum_j J_j t_j, the
change of the output along the tangents. ``jvp(res, tangents, **settings)``
takes ``fwd``'s residuals and a tuple of one tangent per positional argument
(``None`` for integer labels and absent arguments) and returns the output's
tangent. The two are adjoint: <F(t), v> = sum_j <t_j, B(v)_j> for all t, v
(the test of tests/test_forward_functions.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax

_FAMILIES = ("linear", "activation", "loss", "normalization", "conv", "pooling")
_INIT_FAMILIES = ("he", "glorot")


@dataclass(frozen=True)
class Example:
    """A factory of example arguments and the static settings to call with.

    Attributes:
      make_args: ``(key, dtype) -> tuple`` of positional arguments, drawn away
        from the rule's kinks so that finite differences and autodiff agree.
      kwargs: static keyword settings, passed to the rule and its reference.
    """

    make_args: Callable[[jax.Array, Any], tuple]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSpec:
    """How ``fnbp.nn`` builds this rule's parameter-free layer: data only.

    Rules never import the network code; the network reads these fields.

    Attributes:
      factory: the layer's constructor name, used in its error messages
        (``"LeakyRelu"``); empty for the rule's name.
      settings: the layer's settings and their defaults, in order
        (``{"gamma": 0.01}``). The layer's name shows them:
        ``leaky_relu(gamma=0.01)``.
      arrays: the names in ``settings`` that the rule takes as array
        arguments after ``z`` (cast to z's dtype); the others are static
        keyword settings.
    """

    factory: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    arrays: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """Everything that is true of one rule, written once (see the module doc).

    Attributes:
      name: the public name (``"relu"``), also the function's name.
      function: the public, validating function (``fnbp.relu``).
      fwd: ``fwd(*arrays, **settings) -> (output, residuals)``.
      bwd: ``bwd(residuals, v, **settings) -> cotangents``, one per array.
      apply: the ``jax.custom_vjp`` built from ``fwd`` and ``bwd`` (while
        :func:`fnbp.jvp` traces, ``forward_apply``); the public function calls
        it after validating.
      jvp: ``jvp(residuals, tangents, **settings) -> output tangent``, the
        forward function F[M] (see the module doc); ``None`` for a rule
        declared without one.
      forward_apply: the ``jax.custom_jvp`` built from ``fwd`` and ``jvp``:
        the rule in forward mode (``jax.jvp``, ``jax.linearize``,
        ``jax.jacfwd`` of it use F).
      reference: a plain jnp function with the public function's signature and
        no custom derivative (the oracle of ``fnbp check``).
      examples: named example-argument factories; the first is named after
        the rule, the others are variants such as ``"gelu(approximate)"``.
      equations: the notes' equation numbers (``("7.11", "7.69")``); empty for
        a rule the notes do not have.
      kink: one sentence: the derivative taken where the function has none.
      family: one of ``linear``, ``activation``, ``loss``, ``normalization``,
        ``conv``, ``pooling``.
      layer: how to build its parameter-free layer, or ``None``.
      init: ``"he"`` or ``"glorot"``: the initialization of the MM before an
        activation (``fnbp.mlp``); ``None`` for the other families.
      hooks: per-rule extensions by name. The per-example hooks (mm, conv1d,
        conv2d, layer_norm, rms_norm), for a rule M(z, p_1, ..., p_k) with
        residuals ``res`` of its fwd and the cotangent ``v`` of its output
        (``v.shape[0]`` = n examples; further leading axes are positions
        inside an example, summed into its gradient g_i); the static
        settings are keywords, as ``bwd`` gets them:

        - ``"sq_norms"``: ``(res, v, **settings) -> tuple`` of k entries, one
          per argument after z: ``||g_i||^2`` of shape (n,) in at least
          float32, or ``None`` for an absent argument or one that is not a
          trainable parameter (an ``eps``).
        - ``"sq_grads"``: the same with ``sum_i g_i (.) g_i``, shaped like
          the argument.

        Each hook's docstring states its cost rule (Gram form or
        materialized per-example gradients, chosen from the static shapes).

        Optional, for mixed ghost clipping (mm, conv1d, conv2d): where a
        hook above materializes the per-example gradients g_i anyway, these
        hand them over so the engine computes nothing twice:

        - ``"grads"``: ``(res, v, **settings) -> tuple`` of k entries: the
          g_i stacked (n, *argument.shape) where ``sq_norms`` materializes
          them (a bias' alongside its weight's), else ``None``. The clipped
          sum is then ``sum_i s_i g_i``, one contraction over n, instead of
          the backward's weight-gradient pass with the scales in v.
        - ``"moments"``: the same with the pair ``(sum_i g_i, sum_i g_i (.)
          g_i)``, each shaped like the argument, where ``sq_grads``
          materializes the g_i; ``grad_moments`` takes the mean gradient
          from it, and the backward's own weight contraction is dead code.

        Both in at least float32, equal to what ``bwd`` and the two hooks
        above give (tests/test_rule_hooks.py checks them against vmap(grad)).
    """

    name: str
    function: Callable[..., Any]
    fwd: Callable[..., Any]
    bwd: Callable[..., Any]
    apply: Callable[..., Any]
    jvp: Callable[..., Any] | None
    forward_apply: Callable[..., Any] | None
    reference: Callable[..., Any]
    examples: Mapping[str, Example]
    equations: tuple[str, ...]
    kink: str
    family: str
    layer: LayerSpec | None
    init: str | None
    hooks: Mapping[str, Callable[..., Any]]

    def __repr__(self) -> str:
        return f"Rule({self.name})"


_REGISTRY: dict[str, Rule] = {}


def registry() -> Mapping[str, Rule]:
    """Every declared rule by name, in declaration order (read-only)."""
    return types.MappingProxyType(_REGISTRY)


_FORWARD_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fnbp_forward_mode", default=False
)


def in_forward_mode() -> bool:
    """True while :func:`fnbp.jvp` (or ``linearize``, ``jacfwd``) traces its function."""
    return _FORWARD_MODE.get()


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """Trace the rules and layers called inside as ``jax.custom_jvp`` (their F), not
    ``jax.custom_vjp`` (their B): JAX's forward mode goes through the former only."""
    token = _FORWARD_MODE.set(True)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def _by_mode(name: str, reverse: Callable[..., Any], forward: Callable[..., Any] | None):
    """The rule's ``apply``: its custom_vjp, or in forward mode its custom_jvp."""

    def apply(*arrays, **settings):
        if not _FORWARD_MODE.get():
            return reverse(*arrays, **settings)
        if forward is None:
            raise NotImplementedError(
                f"fnbp.jvp: the rule {name} has no forward function; declare it with "
                f"jvp={name}_jvp (see fnbp.rules.declare)"
            )
        return forward(*arrays, **settings)

    return apply


def _primal(fwd: Callable[..., Any]) -> Callable[..., Any]:
    """``fwd(...)[0]``, the output alone; jitted as ``fwd`` is (:func:`jit_static`), so an
    eager call compiles it without the residuals."""

    def forward(*arrays, **settings):
        return fwd(*arrays, **settings)[0]

    static = getattr(fwd, "static_settings", None)
    return forward if static is None else jit_static(*static)(forward)


def custom_vjp(fwd: Callable[..., Any], bwd: Callable[..., Any]) -> Callable[..., Any]:
    """The ``jax.custom_vjp`` whose rule is ``fwd``/``bwd``, as ``f(*arrays, **settings)``.

    The primal is ``fwd(...)[0]``: under ``jax.jit`` the unused residuals are
    dropped by the compiler. When ``fwd`` is itself jitted (:func:`jit_static`)
    the primal is jitted the same way, so an eager call compiles it without
    the residuals too. Static settings travel as one hashable
    non-differentiable argument.
    """

    forward = _primal(fwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def primal(settings, *arrays):
        return forward(*arrays, **dict(settings))

    def primal_fwd(settings, *arrays):
        return fwd(*arrays, **dict(settings))

    def primal_bwd(settings, res, v):
        return tuple(bwd(res, v, **dict(settings)))

    # A jaxpr of the rule names its own fwd and bwd: custom_vjp_call[... bwd=relu_bwd].
    for wrapper, fn in ((primal_fwd, fwd), (primal_bwd, bwd)):
        wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    primal.defvjp(primal_fwd, primal_bwd)

    def apply(*arrays, **settings):
        return primal(tuple(sorted(settings.items())), *arrays)

    return apply


def custom_jvp(fwd: Callable[..., Any], jvp: Callable[..., Any]) -> Callable[..., Any]:
    """The ``jax.custom_jvp`` whose rule is ``fwd`` and the forward function ``jvp``.

    Called as ``f(*arrays, **settings)``, like :func:`custom_vjp`'s. The output
    tangent is ``jvp(residuals, tangents, **settings)``, with ``None`` as the
    tangent of an integer argument (labels); the others are arrays (zeros
    where the caller's tangent is zero).
    """

    forward = _primal(fwd)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def primal(settings, *arrays):
        return forward(*arrays, **dict(settings))

    def primal_jvp(settings, primals, tangents):
        out, res = fwd(*primals, **dict(settings))
        tangents = tuple(
            None if t is None or jax.dtypes.result_type(t) == jax.dtypes.float0 else t
            for t in tangents
        )
        return out, jvp(res, tangents, **dict(settings))

    primal_jvp.__name__ = primal_jvp.__qualname__ = jvp.__name__
    primal.defjvp(primal_jvp)

    def apply(*arrays, **settings):
        return primal(tuple(sorted(settings.items())), *arrays)

    return apply


def _frozen(value: Any) -> Any:
    """Lists as tuples, recursively: static settings must be hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(x) for x in value)
    return value


def jit_static(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``jax.jit`` with the keyword settings ``names`` static.

    One compiled call when used eagerly, inlined under an outer ``jax.jit``.
    Lists among the settings are passed as tuples, so ``padding=[1, 2]``
    works as ``padding=(1, 2)`` does.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        jitted = jax.jit(fn, static_argnames=names)

        @functools.wraps(fn)
        def call(*args, **settings):
            return jitted(*args, **{k: _frozen(v) for k, v in settings.items()})

        # For custom_vjp, which reads it with getattr; a function attribute set through
        # __dict__, since the function's type declares none.
        vars(call)["static_settings"] = names
        return call

    return decorate


def _examples(name: str, examples) -> Mapping[str, Example]:
    if callable(examples) or isinstance(examples, (tuple, Example)):
        examples = {name: examples}
    out = {}
    for variant, example in examples.items():
        if callable(example):
            example = Example(example)
        elif not isinstance(example, Example):
            example = Example(*example)
        out[variant] = example
    if not out or next(iter(out)) != name:
        raise ValueError(f"declare: {name}'s first example must be named {name!r}, got {list(out)}")
    return types.MappingProxyType(out)


def declare(
    function: Callable[..., Any],
    fwd: Callable[..., Any],
    bwd: Callable[..., Any],
    *,
    jvp: Callable[..., Any] | None = None,
    reference: Callable[..., Any],
    examples,
    equations: tuple[str, ...] = (),
    kink: str,
    family: str,
    layer: LayerSpec | None = None,
    init: str | None = None,
    hooks: Mapping[str, Callable[..., Any]] | None = None,
) -> Rule:
    """Build the rule's custom_vjp from ``fwd`` and ``bwd`` and register its record.

    Args:
      function: the public function; its ``__name__`` is the rule's name. It
        validates its arguments and calls the returned record's ``apply``.
      fwd, bwd: the forward with residuals and the backward function (the
        convention is in the module doc); named ``<name>_fwd``/``<name>_bwd``.
      jvp: the forward function F[M], named ``<name>_jvp`` (module doc);
        every built-in rule has one. Without it the rule has no forward mode
        (``Rule.jvp`` and ``Rule.forward_apply`` are ``None``).
      reference: plain jnp code with ``function``'s signature.
      examples: the rule's example: ``(key, dtype) -> args``, an
        :class:`Example` or ``(make_args, kwargs)``; or a mapping from example
        names (the first is the rule's name) to any of those.
      equations: the notes' equation numbers.
      kink: the kink convention, one sentence ("none: smooth" for a smooth rule).
      family: the family, the name of the module that holds the rule.
      layer: a :class:`LayerSpec` for a parameter-free layer, or ``None``.
      init: ``"he"`` or ``"glorot"`` for an activation, else ``None``.
      hooks: per-rule extensions by name (``"sq_norms"``, ``"sq_grads"``,
        optionally ``"grads"``, ``"moments"``: see :class:`Rule`).

    Returns:
      The registered :class:`Rule`.

    Raises:
      ValueError: a name declared twice, a misnamed fwd, bwd or jvp, an unknown
        family or initialization family, a missing kink convention.
    """
    name = function.__name__
    if name in _REGISTRY:
        raise ValueError(
            f"declare: a rule named {name!r} is already declared "
            f"(in {_REGISTRY[name].function.__module__}); pick another name"
        )
    roles = (("fwd", fwd), ("bwd", bwd)) + ((("jvp", jvp),) if jvp is not None else ())
    for role, fn in roles:
        if getattr(fn, "__name__", None) != f"{name}_{role}":
            raise ValueError(
                f"declare: {name}'s {role} must be named {name}_{role}, got "
                f"{getattr(fn, '__name__', fn)!r}"
            )
    if family not in _FAMILIES:
        raise ValueError(f"declare: {name}'s family must be one of {_FAMILIES}, got {family!r}")
    if init not in _INIT_FAMILIES + (None,):
        raise ValueError(
            f"declare: {name}'s init must be one of {_INIT_FAMILIES} or None, got {init!r}"
        )
    if not kink:
        raise ValueError(
            f"declare: {name} needs a kink convention (one sentence; "
            f"'none: smooth' for a smooth rule)"
        )
    forward_apply = None if jvp is None else custom_jvp(fwd, jvp)
    rule = Rule(
        name=name,
        function=function,
        fwd=fwd,
        bwd=bwd,
        apply=_by_mode(name, custom_vjp(fwd, bwd), forward_apply),
        jvp=jvp,
        forward_apply=forward_apply,
        reference=reference,
        examples=_examples(name, examples),
        equations=tuple(equations),
        kink=kink,
        family=family,
        layer=layer,
        init=init,
        hooks=types.MappingProxyType(dict(hooks or {})),
    )
    _REGISTRY[name] = rule
    return rule
