"""check_vjp: the verifier's entry point (see :mod:`fnbp.verify`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnbp.backward import _uses_custom_vjp
from fnbp.verify.arguments import _argument_names, _coarsest, _describe_arg
from fnbp.verify.checker import _Checker
from fnbp.verify.draws import check_factory
from fnbp.verify.finite_diff import FD_RTOL, FD_STEP
from fnbp.verify.probes import PROBES
from fnbp.verify.programs import TRANSFORMS, _Bound
from fnbp.verify.report import DEFAULT_TOLERANCES, Tolerance, VJPReport

KINKS: tuple[str, ...] = ("reference", "any_subgradient")
"""The values of check_vjp's ``kinks``: who decides B at a kink of f.

``"reference"``: the reference's convention (its autodiff value there).
``"any_subgradient"``: any value between f's one-sided derivatives at the
entry, per coordinate and jointly along random directions over the entries
at kinks (so a max that gives every tied entry the whole cotangent is still
wrong): the Clarke subdifferential's bounds that one-sided differences see.
"""

_TOLERANCE_HINTS = {
    "rtol": "a row passes when max abs err <= atol + rtol * max |want|",
    "atol": "a row passes when max abs err <= atol + rtol * max |want|",
    "fd_rtol": f"the relative tolerance of the float64 finite differences (default {FD_RTOL:g})",
    "fd_step": f"the central-difference step relative to max(1, max |x|) (default {FD_STEP:.2g})",
}


def positive_finite(fn: str, name: str, value: Any) -> float:
    """``value`` as a float, or the error naming ``fn`` and ``name``: a tolerance or a step.

    A negative or NaN tolerance fails every check (a correct rule would be
    reported as "not linear in v"), a zero one asks for bit-exact results
    and an infinite one passes anything, so each is refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{fn}: {name} must be a positive number, got {type(value).__name__} {value!r}"
        )
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        default = " (or None for the dtype's default)" if name in ("rtol", "atol") else ""
        raise ValueError(
            f"{fn}: {name} must be a positive finite number, got {number!r}; "
            f"{_TOLERANCE_HINTS[name]}: pass a positive value{default}"
        )
    return number


def check_vjp(
    f: Callable[..., Any],
    *arrays: Any,
    args: Callable[..., Any] | None = None,
    reference: Callable[..., Any] | None = None,
    static_kwargs: Mapping[str, Any] | None = None,
    transforms: Sequence[str] | None = None,
    n_directions: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    fd_rtol: float = FD_RTOL,
    fd_step: float = FD_STEP,
    probes: bool | Sequence[str] = True,
    dtype: Any = None,
    draws: int = 3,
    kinks: str = "reference",
) -> VJPReport:
    """Check f's backward function B[f, z](v) = (df/dz)^T v at the given arguments.

    B comes from f's own rule through ``jax.vjp`` (for a ``jax.custom_vjp``
    function, its hand-written bwd). It is run under each of ``transforms``
    and compared with ``jax.vjp`` of ``reference`` (float64), with float64
    central differences (the dot-product test <J t, c> = <t, J^T c>), with a
    loop over examples for the batched transforms, and checked for the
    properties of a backward function (linear in v, B(0) = 0, cotangent
    shapes and dtypes, the fwd rule's primal output, determinism). Then B is
    checked again at probe points derived from the arguments (zeros, the
    reference's kinks, flipped signs, large magnitudes, an offset mean, ties;
    see :mod:`fnbp.verify.probes`). See the module docstring for the oracles,
    the kink handling and the tolerance table.

    Example::

        report = fnbp.check_vjp(fnbp.mm, z, W, b, reference=lambda z, W, b: z @ W.T + b)
        print(report)
        report.assert_ok()

        # a factory of arguments: drawn at several keys and at distinct sizes
        def mm_args(key, dtype, sizes=(3, 3, 3)):
            n, m, k = sizes
            kz, kw, kb = jax.random.split(key, 3)
            return (jax.random.normal(kz, (n, m), dtype), jax.random.normal(kw, (k, m), dtype),
                    jax.random.normal(kb, (k,), dtype))
        fnbp.check_vjp(fnbp.mm, args=mm_args, reference=...)

    Args:
      f: the function to check, e.g. a ``jax.custom_vjp`` function or a
        function built from such rules. Its outputs must be floating arrays (a
        pytree of them).
      *arrays: the point z: positional arguments of ``f``, pytrees of arrays.
        Integer leaves get no cotangent (float0) and no rows. NumPy float64
        arrays are checked in float64 even when ``jax_enable_x64`` is off
        (x64 is turned on for the check, and a note says so).
      args: instead of ``arrays``, a factory ``(key, dtype) -> tuple`` of
        positional arguments. It is drawn at ``draws`` keys (the first with
        the full check and the probes, the others under the first transform),
        and, when it takes a keyword ``sizes`` whose default is a tuple of
        sizes with repeats (a square shape), once more with every size made
        distinct, so a rule that is right only for square shapes is caught.
        Those rows name the draw in their ``probe`` column (``key 2``,
        ``sizes (3, 4, 5)``).
      reference: a plain implementation of the same function with the same
        signature, differentiated by autodiff as the oracle. ``None``: finite
        differences only.
      static_kwargs: keyword settings passed, never traced, to ``f`` and
        ``reference`` (``functools.partial`` does the same).
      transforms: a subset of :data:`TRANSFORMS` (default: all).
      n_directions: cotangents v_j and directions t_j drawn (at least 2).
      seed: seed of those random draws (numpy; results are reproducible).
      rtol: relative tolerance, a positive finite number; default from
        :data:`DEFAULT_TOLERANCES` for the coarsest floating dtype of the
        inputs and outputs.
      atol: absolute tolerance, a positive finite number; default from the
        same table.
      fd_rtol: relative tolerance of the float64 finite differences
        (positive, finite).
      fd_step: central-difference step relative to max(1, max |x|)
        (positive, finite).
      probes: ``True`` (every kind of :data:`fnbp.verify.probes.PROBES`),
        ``False``, or the kinds to derive.
      dtype: the dtype the factory ``args`` is drawn at (default float64).
      draws: how many keys the factory ``args`` is drawn at (at least 1).
      kinks: what B may return at an entry where f has a kink (its one-sided
        derivatives there differ), when it differs from the reference.
        ``"reference"`` (default): the reference's convention decides, as
        everywhere; a rule that differs from it only at kinks, by values
        between the one-sided derivatives, fails with the diagnosis
        ``differs from the reference's convention at the kink z=0 (yours 0,
        reference 1; one-sided derivatives -1 and 1)``.
        ``"any_subgradient"``: any value between the one-sided derivatives
        is accepted there (estimated by one-sided float64 differences of the
        reference; see :data:`KINKS`), and the row's note says where. A
        value outside them still fails.

    Returns:
      A :class:`VJPReport`; nothing is raised for a wrong B: call
      :meth:`VJPReport.assert_ok` for that.

    Raises:
      TypeError: f or reference not callable, a non-array leaf in args, a
        non-floating output of f.
      ValueError: f (or reference) rejects args, the reference's output has
        another structure or shape than f's, no floating argument to check,
        an unknown transform or probe, both ``arrays`` and ``args``, a
        tolerance or step that is not a positive finite number, an unknown
        ``kinks``.
    """
    fn = "check_vjp"
    if not callable(f):
        raise TypeError(f"{fn}: f must be callable, got {type(f).__name__}")
    if reference is not None and not callable(reference):
        raise TypeError(f"{fn}: reference must be callable or None, got {type(reference).__name__}")
    if static_kwargs is not None and not isinstance(static_kwargs, Mapping):
        raise TypeError(
            f"{fn}: static_kwargs must be a dict of keyword settings, "
            f"got {type(static_kwargs).__name__}"
        )
    transforms = TRANSFORMS if transforms is None else tuple(transforms)
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"{fn}: unknown transform(s) {unknown}; choose from {list(TRANSFORMS)}")
    if not transforms:
        raise ValueError(f"{fn}: transforms is empty; choose from {list(TRANSFORMS)}")
    for name, value in (("rtol", rtol), ("atol", atol), ("fd_rtol", fd_rtol), ("fd_step", fd_step)):
        if value is not None or name.startswith("fd"):
            positive_finite(fn, name, value)
    if kinks not in KINKS:
        raise ValueError(f"{fn}: kinks must be one of {', '.join(map(repr, KINKS))}, got {kinks!r}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 2:
        raise ValueError(f"{fn}: n_directions must be an int >= 2, got {n_directions!r}")
    kinds = PROBES if probes is True else () if probes is False else tuple(probes)
    bad = [k for k in kinds if k not in PROBES]
    if bad:
        raise ValueError(
            f"{fn}: unknown probe(s) {bad}; choose from {list(PROBES)} (or probes=True / False)"
        )
    settings = dict(
        reference=reference,
        static_kwargs=static_kwargs,
        transforms=transforms,
        n_directions=n_directions,
        seed=seed,
        rtol=rtol,
        atol=atol,
        fd_rtol=fd_rtol,
        fd_step=fd_step,
        kinks=kinks,
    )
    if args is not None:
        if arrays:
            raise ValueError(
                f"{fn}: pass the arguments either positionally or as a factory args=, not both"
            )
        if not callable(args):
            raise TypeError(
                f"{fn}: args must be a factory (key, dtype) -> tuple, got {type(args).__name__}"
            )
        return check_factory(f, args, dtype, draws, kinds, settings)
    if dtype is not None:
        raise ValueError(f"{fn}: dtype= is for the factory args=; cast the arrays instead")
    if not jax.config.jax_enable_x64 and any(
        isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype == np.float64
        for leaf in jax.tree_util.tree_leaves(arrays)
    ):
        with jax.enable_x64(True):
            report = _check(f, arrays, kinds, **settings)
        note = (
            "float64 NumPy arguments with jax_enable_x64 off: checked in float64, with "
            "x64 turned on for this check"
        )
        return dataclasses.replace(report, notes=report.notes + (note,))
    return _check(f, arrays, kinds, **settings)


def _check(
    f,
    args: tuple,
    kinds: Sequence[str],
    *,
    reference,
    static_kwargs,
    transforms,
    n_directions,
    seed,
    rtol,
    atol,
    fd_rtol,
    fd_step,
    kinks,
) -> VJPReport:
    """check_vjp at one point (its arguments validated)."""
    fn = "check_vjp"
    kwargs = dict(static_kwargs or {})
    name = getattr(f, "__name__", None) or type(f).__name__
    fk = _Bound(f, kwargs)
    refk = None if reference is None else _Bound(reference, kwargs)

    names = _argument_names(f, len(args))
    infos = [_describe_arg(n, a) for n, a in zip(names, args)]
    args = tuple(info.rebuild(info.leaves) for info in infos)

    try:  # tracing runs f's own checks of shapes and dtypes, and compiles nothing
        jaxpr, out_shape = jax.make_jaxpr(fk, return_shape=True)(*args)
    except Exception as err:
        raise ValueError(
            f"{fn}: f(*args) raised {type(err).__name__}: {err}; pass arguments that "
            f"{name} accepts (static settings go in static_kwargs)"
        ) from err
    out_structs, out_treedef = jax.tree_util.tree_flatten(out_shape)
    if not out_structs:
        raise ValueError(f"{fn}: {name} returns no array, there is nothing to differentiate")
    for leaf in out_structs:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: {name} returns a {leaf.dtype} output; check_vjp needs floating "
                f"outputs (wrap f so it returns only its floating outputs)"
            )
    if refk is not None:
        try:
            ref_shape = jax.eval_shape(refk, *args)
        except Exception as err:
            raise ValueError(
                f"{fn}: reference(*args) raised {type(err).__name__}: {err}; "
                f"the reference must take f's arguments"
            ) from err
        ref_treedef: jax.tree_util.PyTreeDef
        ref_structs, ref_treedef = jax.tree_util.tree_flatten(ref_shape)
        shapes = [tuple(s.shape) for s in out_structs]
        ref_shapes = [tuple(s.shape) for s in ref_structs]
        if ref_treedef != out_treedef or ref_shapes != shapes:
            show = lambda s: s[0] if len(s) == 1 else s  # noqa: E731
            raise ValueError(
                f"{fn}: the reference returns shape {show(ref_shapes)} but {name} returns "
                f"shape {show(shapes)} for the same arguments; the reference must compute "
                f"the same function as f"
            )

    diff = [k for k, info in enumerate(infos) if info.floats]
    if not diff:
        raise ValueError(
            f"{fn}: no argument of {name} has a floating leaf, so there is no cotangent to check"
        )
    dtype = _coarsest(
        [info.leaves[k].dtype for info in infos for k in info.floats]
        + [s.dtype for s in out_structs]
    )
    default = DEFAULT_TOLERANCES.get(dtype.name, DEFAULT_TOLERANCES["float32"])
    tol = Tolerance(default.rtol if rtol is None else rtol, default.atol if atol is None else atol)

    checker = _Checker(
        fk,
        refk,
        args,
        infos,
        diff,
        out_structs,
        out_treedef,
        tol,
        fd_rtol,
        fd_step,
        n_directions,
        seed,
        transforms,
        dtype,
        kinds,
        kinks,
    )
    checker.run()
    notes = []
    if not _uses_custom_vjp(jaxpr.jaxpr):
        notes.append(f"{name} has no jax.custom_vjp rule: its derivative comes from autodiff")
    if checker.kinks:
        notes.append(
            "at a kink: "
            + ", ".join(infos[i].name for i in checker.kinks)
            + " (finite differences leave those directions out)"
        )
    if checker.probed:
        oracle = (
            "the reference decides at kinks and ties (its convention)"
            if refk is not None
            else "finite differences, which leave kinks out"
        )
        notes.append(f"probes: {', '.join(checker.probed)}; oracle there: {oracle}")
    plain = not _uses_custom_vjp(jaxpr.jaxpr)
    return VJPReport(
        name,
        dtype.name,
        jax.default_backend(),
        tuple(checker.rows),
        tuple(notes),
        custom_vjp=not plain,
    )
