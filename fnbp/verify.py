"""The verifier: check a hand-written VJP against autodiff and finite differences.

A backward function B[f, z](v) = (df/dz)^T v (CS229 notes, eqs. 7.57-7.59)
must be right at every point, for every argument, under every transform a
caller will put it through. :func:`check_vjp` computes B with ``f``'s own rule
(its ``jax.custom_vjp``, through ``jax.vjp``) and compares it with
independent oracles::

    report = fnbp.check_vjp(my_relu, z, reference=lambda z: jnp.where(z > 0, z, 0.0))
    print(report)          # one row per (argument, transform, oracle)
    report.assert_ok()     # AssertionError naming argument, transform, oracle

Oracles (the ``oracle`` column):

- ``reference``: ``jax.vjp`` of ``reference``, a plain implementation of the
  same function, evaluated in float64 on the same (exactly up-cast) inputs.
  At a kink the reference's convention decides.
- ``finite diff``: central differences of ``f`` in float64 through the
  dot-product test <J t, c> = <t, J^T c> over ``n_directions`` random
  directions t (in one argument) and cotangents c. Kinks are detected: a
  direction whose one-sided slopes disagree (f is not differentiable there)
  is left out and reported in the note, never failed; a point merely close to
  a kink is handled by shrinking the step until two steps agree.
- ``loop``: a batched transform against the same rule called one example at
  a time.
- properties of B: ``linearity`` B(a v1 + b v2) = a B(v1) + b B(v2);
  ``zero v`` B(0) = 0; ``shape/dtype`` each cotangent has its primal's shape
  and dtype (float0, i.e. none, for integer arguments); ``primal`` the
  primal output of ``jax.vjp`` (the fwd rule's) equals ``f(*args)`` (and
  the reference's, when given); ``rerun`` two runs give the same cotangents.

Transforms (the ``transform`` column), see :data:`TRANSFORMS`: ``eager``,
``jit``, ``vmap`` (a batch of cotangents), ``jit(vmap)``, ``vmap(inputs)``
(a stacked batch of inputs, member m a copy of the arguments with each
floating entry scaled by 1 + 0.05 u, u uniform in [-1, 1], member 1 the
arguments themselves, and of cotangents), ``jit(vmap(inputs))`` and
``2nd order``: the gradient of the cotangent-weighted gradient,
grad_z <B[f, z](v), u>, taken reverse-over-reverse (forward mode does not
pass through ``jax.custom_vjp``), checked against the same expression for the
reference and against finite differences of the rule's own B. The
properties are checked under ``jit`` (eagerly when ``jit`` is not asked
for). ``vmap`` hides the batch axis from the rule (``v.ndim`` and
``v.shape`` stay per-example), so what goes wrong under ``vmap`` alone is a
rule that does see the batch: a ``jax.custom_batching.custom_vmap`` batching
rule, a callback's ``vmap_method``.

Cost. Compiling is nearly all of it, so each check compiles a handful of
small programs and runs each many times; on CPU they are compiled with
:data:`FAST_COMPILE`, and programs are shared between checks of the same
function (other dtypes, other seeds). The ``eager`` and eager ``vmap``
transforms compile each operation on its own, which is slower.

Errors and tolerances. For an argument (all its floating leaves, over all
cotangents drawn) ``max abs err = max |got - want|``; ``max rel err`` is
that over ``max |want|``; a row passes when
``max abs err <= atol + rtol * max |want|``. The tolerance comes from the
coarsest floating dtype among the inputs and outputs (:data:`DEFAULT_TOLERANCES`;
``rtol=``/``atol=`` override it):

    ========  =======  =======
    dtype     rtol     atol
    ========  =======  =======
    float64   1e-10    1e-12
    float32   1e-4     1e-6
    float16   1e-2     1e-3
    bfloat16  5e-2     1e-2
    ========  =======  =======

Finite-difference rows compare scalars per direction, relative to the size of
the terms summed (so cancellation does not inflate the error), with
``rtol = max(dtype rtol, fd_rtol)`` (``fd_rtol`` grows tenfold for each
tenfold reduction of the step near a kink).

Arguments. ``args`` are pytrees of arrays; each top-level positional argument
is one row group (a pytree's worst index names its leaf). Integer and boolean
leaves are not differentiated (their cotangent is float0); an argument with no
floating leaf (a label array, ``None``) gets no rows. Static settings (a
Python bool, a string, an axis) are not arrays: pass them as
``static_kwargs={"approximate": True}`` or bind them with
``functools.partial(f, approximate=True)``; they are passed to ``f`` and to
``reference`` as keyword arguments and never traced.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fnbp._compile import FAST_CPU_COMPILE, fast_compile_options
from fnbp.backward import _uses_custom_vjp


@dataclass(frozen=True)
class Tolerance:
    """A row passes when ``max abs err <= atol + rtol * max |want|``."""

    rtol: float
    atol: float


DEFAULT_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType({
    "float64": Tolerance(rtol=1e-10, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-6),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=1e-2),
})
"""Default tolerance per working dtype (the coarsest floating dtype in play)."""

FD_RTOL = 1e-6
"""Relative tolerance of a float64 central difference at the default step."""

FD_STEP = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)
"""Default central-difference step, relative to max(1, max |x|): about 6e-6."""

TRANSFORMS: tuple[str, ...] = (
    "eager", "jit", "vmap", "jit(vmap)", "vmap(inputs)", "jit(vmap(inputs))", "2nd order",
)
"""Every transform :func:`check_vjp` runs B under (all by default)."""

_FD_LEVELS = 4              # steps h, h/10, h/100, h/1000
_FD_CONVERGED = 1e-6        # two steps agree: |E_k - E_k+1| <= this * scale
_KINK = 1e-3                # one-sided slopes disagree by more than this * scale: a kink
_PERTURBATION = 0.05        # vmap(inputs): member m is x (1 + 0.05 u), u uniform in [-1, 1]
_LINEAR_A, _LINEAR_B = 0.5, -2.0


# --- the report -------------------------------------------------------------------


@dataclass(frozen=True)
class VJPCheck:
    """One row of a :class:`VJPReport`: one argument, transform and oracle.

    Attributes:
      argument: the argument's name (from f's signature), or ``(output)``.
      transform: how B was run (one of :data:`TRANSFORMS`).
      oracle: what it was compared with (``reference``, ``finite diff``,
        ``loop``) or the property checked (``linearity``, ``zero v``,
        ``shape/dtype``, ``primal``, ``rerun``, ``runs``).
      max_abs_err: max |got - want| (NaN when nothing could be compared).
      max_rel_err: max_abs_err over max |want| (per direction for finite
        differences).
      worst_index: where the largest error sits: the leaf and index, and
        which cotangent (``v1``...) or direction (``dir 2``).
      rtol: relative tolerance used.
      atol: absolute tolerance used.
      passed: whether the row passed.
      note: what else the reader should know (kinks, an exception).
    """

    argument: str
    transform: str
    oracle: str
    max_abs_err: float
    max_rel_err: float
    worst_index: str
    rtol: float
    atol: float
    passed: bool
    note: str = ""

    def __post_init__(self) -> None:
        # Plain Python numbers (not numpy scalars), so that to_dict() is JSON-able.
        for name in ("max_abs_err", "max_rel_err", "rtol", "atol"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "passed", bool(self.passed))

    def describe(self) -> str:
        """One line naming the argument, transform and oracle, and the numbers."""
        where = f" at {self.worst_index}" if self.worst_index else ""
        note = f"; {self.note}" if self.note else ""
        return (f"argument {self.argument!r}, transform {self.transform!r}, oracle "
                f"{self.oracle!r}: max rel err {_num(self.max_rel_err)} (max abs err "
                f"{_num(self.max_abs_err)}{where}), rtol {_num(self.rtol)}, atol "
                f"{_num(self.atol)}{note}")


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}"


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class VJPReport:
    """What :func:`check_vjp` found: a table of :class:`VJPCheck` rows.

    ``str(report)`` is a readable table, ``report.to_dict()`` is JSON-able,
    ``report.assert_ok()`` raises ``AssertionError`` naming each failing
    argument, transform and oracle.

    Attributes:
      function: f's name.
      dtype: the working dtype that chose the default tolerances.
      backend: the JAX backend B ran on.
      rows: one row per (argument, transform, oracle).
      notes: remarks about the whole check (no custom_vjp in f, kinks).
    """

    function: str
    dtype: str
    backend: str
    rows: tuple[VJPCheck, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return all(row.passed for row in self.rows)

    @property
    def failures(self) -> tuple[VJPCheck, ...]:
        """The rows that failed."""
        return tuple(row for row in self.rows if not row.passed)

    def _header(self) -> str:
        passed = sum(row.passed for row in self.rows)
        return (f"check_vjp({self.function}) dtype={self.dtype} backend={self.backend}: "
                f"{passed}/{len(self.rows)} checks pass")

    def table(self, rows: Sequence[VJPCheck] | None = None) -> str:
        """The rows (all by default) as an aligned text table."""
        rows = self.rows if rows is None else rows
        head = ("argument", "transform", "oracle", "max abs err", "max rel err",
                "worst index", "rtol", "result", "note")
        body = [(r.argument, r.transform, r.oracle, _num(r.max_abs_err), _num(r.max_rel_err),
                 r.worst_index, _num(r.rtol), "PASS" if r.passed else "FAIL", r.note)
                for r in rows]
        widths = [max(len(str(line[c])) for line in [head, *body]) for c in range(len(head))]
        lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip()
                 for line in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return "\n".join([self._header(), *(f"note: {n}" for n in self.notes), self.table()])

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python data, ready for ``json.dumps``.

        Non-finite numbers become the strings ``"inf"`` and ``"nan"``.
        """
        rows = []
        for row in self.rows:
            data = asdict(row)
            for key in ("max_abs_err", "max_rel_err", "rtol", "atol"):
                data[key] = _json_float(data[key])
            rows.append(data)
        return {"function": self.function, "dtype": self.dtype, "backend": self.backend,
                "passed": self.ok, "notes": list(self.notes), "rows": rows}

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` listing every failing row; return if all pass."""
        failures = self.failures
        if failures:
            lines = [f"{self._header()}; failing:"]
            lines += [f"  {row.describe()}" for row in failures]
            raise AssertionError("\n".join(lines))


# --- arguments --------------------------------------------------------------------


@dataclass(frozen=True)
class _Arg:
    """One top-level positional argument: its name, leaves and floating leaves."""

    name: str
    treedef: Any
    leaves: tuple[jax.Array, ...]
    paths: tuple[str, ...]
    floats: tuple[int, ...]      # indices of the floating leaves

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def with_floats(self, values: Sequence[Any]) -> Any:
        leaves = list(self.leaves)
        for index, value in zip(self.floats, values):
            leaves[index] = value
        return self.rebuild(leaves)


def _argument_names(f: Callable[..., Any], n: int) -> list[str]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            names += [f"{p.name}[{k}]" for k in range(n - len(names))]
            break
    names = names[:n]
    return names + [f"arg{k}" for k in range(len(names), n)]


def _as_leaf(fn: str, name: str, leaf: Any) -> jax.Array:
    if isinstance(leaf, (bool, str, bytes)) or not (
        isinstance(leaf, (int, float, np.ndarray, np.generic, jax.Array))
    ):
        raise TypeError(
            f"{fn}: argument {name!r} holds a {type(leaf).__name__} leaf, not an array; "
            f"pass static settings through static_kwargs={{...}} or functools.partial"
        )
    if isinstance(leaf, (np.ndarray, np.generic)):
        leaf = _put(leaf)
    elif not isinstance(leaf, jax.Array):
        leaf = jnp.asarray(leaf)   # a Python number: weakly typed, as JAX treats it
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
        raise TypeError(f"{fn}: argument {name!r} is complex; only real floating and "
                        f"integer arguments are supported")
    return leaf


def _describe_arg(name: str, arg: Any) -> _Arg:
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(arg)
    leaves = tuple(_as_leaf("check_vjp", name, leaf) for _, leaf in with_paths)
    paths = tuple(jax.tree_util.keystr(path) for path, _ in with_paths)
    floats = tuple(k for k, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating))
    return _Arg(name, treedef, leaves, paths, floats)


def _coarsest(dtypes: Sequence[Any]) -> np.dtype:
    return max((jnp.dtype(d) for d in dtypes), key=lambda d: float(jnp.finfo(d).eps))


# --- comparisons ------------------------------------------------------------------


def _put(x: np.ndarray) -> jax.Array:
    # jax.device_put compiles nothing; jnp.asarray compiles a program per shape.
    return jax.device_put(x)


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _index(idx: tuple[int, ...]) -> str:
    return f"[{', '.join(str(int(i)) for i in idx)}]" if idx else "()"


def _measure(triples: Sequence[tuple[str, Any, Any]]) -> tuple[float, float, str, float]:
    """max |got - want|, max |want| and where, over (label, got, want) leaves.

    Returns (max abs err, max rel err, worst index, scale). NaN in both at the
    same place counts as equal; NaN or infinity on one side only is an
    infinite error.
    """
    worst, where, scale = -1.0, "", 0.0
    for label, got, want in triples:
        got, want = _f64(got), _f64(want)
        if got.shape != want.shape:
            return math.inf, math.inf, f"{label} shape {got.shape} vs {want.shape}", 0.0
        diff = np.abs(got - want)
        same = (np.isnan(got) & np.isnan(want)) | (got == want)
        diff = np.where(same, 0.0, np.where(np.isfinite(diff), diff, np.inf))
        finite = np.abs(want[np.isfinite(want)])
        scale = max(scale, float(finite.max(initial=0.0)))
        if diff.size and float(diff.max()) > worst:
            idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
            worst, where = float(diff[idx]), label.format(idx=_index(idx))
    worst = max(worst, 0.0)
    rel = worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)
    return worst, rel, where, scale


def _row(argument: str, transform: str, oracle: str, triples, tol: Tolerance,
         note: str = "") -> VJPCheck:
    abs_err, rel_err, where, scale = _measure(triples)
    passed = abs_err <= tol.atol + tol.rtol * scale
    return VJPCheck(argument, transform, oracle, abs_err, rel_err, where, tol.rtol,
                    tol.atol, passed, note)


def _error_row(argument: str, transform: str, oracle: str, err: BaseException,
               tol: Tolerance) -> VJPCheck:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return VJPCheck(argument, transform, oracle, math.nan, math.nan, "", tol.rtol, tol.atol,
                    False, f"raised {type(err).__name__}: {message}"[:300])


# --- the check --------------------------------------------------------------------


def _x64():
    """float64 for the oracles, also when the caller has not enabled it."""
    return contextlib.nullcontext() if jax.config.jax_enable_x64 else jax.enable_x64(True)


def _as_dtype(x: np.ndarray, dtype: Any) -> jax.Array:
    # The cast happens in numpy, so no XLA program is compiled for it.
    return _put(np.asarray(x).astype(np.dtype(dtype)))


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: _put(np.stack([np.asarray(x) for x in xs])),
                                  *trees)


def _to64(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: _put(_f64(x)), tree)


def _fetch(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def _unstack(tree: Any, n: int) -> list[Any]:
    tree = _fetch(tree)
    return [jax.tree_util.tree_map(lambda x, j=j: x[j], tree) for j in range(n)]


Cotangents = tuple  # per differentiable argument, the cotangents of its floating leaves
Selection = tuple   # per differentiable argument: (its position, its floating leaves)


class _Bound:
    """f with its static keyword settings, hashable so that jit reuses programs.

    Two checks of the same function with the same settings (another dtype,
    another seed) then share the compiled float64 oracles.
    """

    def __init__(self, f: Callable[..., Any], kwargs: Mapping[str, Any]):
        self.f, self.kwargs = f, tuple(sorted(kwargs.items()))
        try:
            self._key = hash((self.f, self.kwargs))
        except TypeError:   # unhashable settings: this object is its own key
            self._key = None
        self.__name__ = getattr(f, "__name__", None) or type(f).__name__

    def __call__(self, *args: Any) -> Any:
        return self.f(*args, **dict(self.kwargs))

    def __hash__(self) -> int:
        return id(self) if self._key is None else self._key

    def __eq__(self, other: object) -> bool:
        if self._key is None or not isinstance(other, _Bound) or other._key is None:
            return self is other
        return self.f is other.f and self.kwargs == other.kwargs


def _select(sel: Selection, cts: Sequence[Any]) -> Cotangents:
    """Per differentiable argument, the cotangents of its floating leaves."""
    return tuple(tuple(jax.tree_util.tree_leaves(cts[i])[k] for k in floats)
                 for i, floats in sel)


def _B(fk: Callable[..., Any], sel: Selection, args: tuple, v: Any) -> Cotangents:
    """B[f, args](v) by f's own rule, through ``jax.vjp``."""
    _, pull = jax.vjp(fk, *args)
    return _select(sel, pull(v))


def _second(fk: Callable[..., Any], sel: Selection, args: tuple, v0: Any, u: Any) -> Cotangents:
    """grad_z <B[f, z](v0), u>: the vjp of z -> B[f, z](v0), reverse over reverse."""
    return _B(lambda *z: _B(fk, sel, z, v0), sel, args, u)


def _core(fk: Callable[..., Any], sel: Selection, args: tuple, v: Any):
    """f(*args), the vjp's primal output (the fwd rule's) and B(v)."""
    primal, pull = jax.vjp(fk, *args)
    return fk(*args), primal, _select(sel, pull(v))


def _batched_v(fk, sel, args, V):
    return jax.vmap(functools.partial(_B, fk, sel), in_axes=(None, 0))(args, V)


def _batched_inputs(fk, sel, A, V):
    return jax.vmap(functools.partial(_B, fk, sel))(A, V)


FAST_COMPILE: Mapping[str, Any] = FAST_CPU_COMPILE
"""XLA options of the verifier's programs on CPU (speed only).

The programs are small and each runs a few times, so compiling is nearly all
their cost: without LLVM's optimizations and with XLA's classic elemental
emitters it is 2-5 times cheaper on a 2-core CPU. Results agree with the
default build to a few ulps (transcendental functions), far below every
tolerance. An option the installed jaxlib does not know is skipped (each is
probed once, see :func:`fnbp._compile.supported_options`), so the verifier
runs on every supported jax. Other backends compile with their defaults.
"""


@functools.cache
def _compiled(fn: Callable[..., Any], backend: str,
              options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    return jax.jit(fn, static_argnums=(0, 1),
                   compiler_options=fast_compile_options(backend, dict(options)))


def jit_fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit(fn)`` with its first two arguments static, compiled for speed.

    Used for the verifier's own programs (and by ``fnbp check`` for the
    catalog's example arguments); see :data:`FAST_COMPILE`.
    """
    return _compiled(fn, jax.default_backend(), tuple(sorted(FAST_COMPILE.items())))


class _Checker:
    """One call of :func:`check_vjp`: the random draws, the programs and the rows.

    Compiling dominates the cost of a check, so there are few programs, each
    called many times: module-level functions jitted with f (or the
    reference) and the selection of arguments as static arguments. The
    float64 oracles reuse them: the reference runs ``_core`` and ``_second``
    of the reference in float64; finite differences run ``_core`` of f in
    float64 (f and B[f, .](v0) at each point). Checks of the same function at
    other dtypes or seeds share those programs. Arrays are stacked, cast and
    sliced in numpy, so no XLA program is compiled for that.
    """

    def __init__(self, fk, refk, args: tuple, infos: list[_Arg], diff: list[int],
                 out_structs: list, out_treedef, tol: Tolerance, fd_rtol: float,
                 fd_step: float, n: int, seed: int, transforms: Sequence[str]):
        self.fk, self.refk, self.args, self.infos, self.diff = fk, refk, args, infos, diff
        self.tol, self.fd_rtol, self.fd_step, self.n = tol, fd_rtol, fd_step, n
        self.transforms = transforms
        self.sel: Selection = tuple((i, infos[i].floats) for i in diff)
        self.rows: list[VJPCheck] = []
        self.kinks: dict[int, str] = {}
        rng = np.random.default_rng(seed)

        def draw_output():
            return out_treedef.unflatten([_as_dtype(rng.standard_normal(s.shape), s.dtype)
                                          for s in out_structs])
        self.C = [draw_output() for _ in range(n)]
        self.v0 = draw_output()
        self.T = [[self._unit([rng.standard_normal(infos[i].leaves[k].shape)
                               for k in infos[i].floats]) for _ in range(n)] for i in diff]
        self.U = [tuple(tuple(rng.standard_normal(infos[i].leaves[k].shape)
                              for k in infos[i].floats) for i in diff) for _ in range(n)]
        self.members = [args] + [self._perturb(rng) for _ in range(n - 1)]
        self.jit = "jit" in transforms

    def core(self, args: tuple, v: Any):
        """f, the primal output and B(v): jitted when "jit" is checked, else eager."""
        return _fetch((jit_fast(_core) if self.jit else _core)(self.fk, self.sel, args, v))

    @staticmethod
    def _unit(leaves: list[np.ndarray]) -> list[np.ndarray]:
        biggest = max(float(np.abs(x).max(initial=0.0)) for x in leaves)
        return [x / biggest if biggest > 0 else x for x in leaves]

    def _perturb(self, rng: np.random.Generator) -> tuple:
        members = []
        for info in self.infos:
            values = []
            for k in info.floats:
                x = info.leaves[k]
                scale = 1 + _PERTURBATION * rng.uniform(-1, 1, x.shape)
                values.append(_as_dtype(_f64(x) * scale, x.dtype))
            members.append(info.with_floats(values))
        return tuple(members)

    def args64(self) -> tuple:
        """The arguments with every floating leaf up-cast (exactly) to float64."""
        return tuple(info.with_floats([_put(_f64(info.leaves[k])) for k in info.floats])
                     for info in self.infos)

    def u_like(self, cotangents: Cotangents, j: int) -> Cotangents:
        """The j-th 2nd-order weight u_j, in the dtypes B returns."""
        return tuple(tuple(_as_dtype(u, np.asarray(s).dtype) for u, s in zip(us, ss))
                     for us, ss in zip(self.U[j], cotangents))

    # --- rows -----------------------------------------------------------------

    def attempt(self, transform: str, fn: Callable[[], Any], oracle: str = "runs"):
        """``fn()``, or ``None`` and a failing row naming the exception."""
        try:
            return fn()
        except Exception as err:  # any failure of f under a transform is a finding
            self.rows.append(_error_row(self._blame(err), transform, oracle, err, self.tol))
            return None

    def _blame(self, err: BaseException) -> str:
        # JAX names a bad bwd output "output[k]": the k-th primal argument.
        found = re.search(r"output\[(\d+)\]", str(err))
        if found and int(found.group(1)) < len(self.infos):
            return self.infos[int(found.group(1))].name
        return "(all)"

    def compare(self, transform: str, oracle: str, got: Sequence[Cotangents],
                want: Sequence[Cotangents], label: str = "v", note: str = "") -> None:
        """One row per differentiable argument: got[j] against want[j], all j."""
        for p, i in enumerate(self.diff):
            info = self.infos[i]
            triples = []
            for j, (g, w) in enumerate(zip(got, want)):
                suffix = f" {label}{j + 1}" if len(got) > 1 else ""
                for k, gl, wl in zip(info.floats, g[p], w[p]):
                    path = info.paths[k].replace("{", "{{").replace("}", "}}")
                    triples.append((path + "{idx}" + suffix, gl, wl))
            self.rows.append(_row(info.name, transform, oracle, triples, self.tol,
                                  self.kinks.get(i, "") if oracle == "reference" else note))

    def check_shapes(self, transform: str, got: Cotangents) -> None:
        for p, i in enumerate(self.diff):
            info = self.infos[i]
            bad = []
            for k, ct in zip(info.floats, got[p]):
                leaf = info.leaves[k]
                if np.shape(ct) != leaf.shape or np.asarray(ct).dtype != leaf.dtype:
                    bad.append(f"{info.paths[k] or info.name}: cotangent "
                               f"{np.asarray(ct).dtype}{list(np.shape(ct))} for primal "
                               f"{leaf.dtype}{list(leaf.shape)}")
            err = math.inf if bad else 0.0
            self.rows.append(VJPCheck(info.name, transform, "shape/dtype", err, err, "",
                                      0.0, 0.0, not bad, "; ".join(bad)))

    # --- finite differences (float64) -----------------------------------------

    def fd_probe(self, F, args64: tuple, weights: Sequence[Sequence[Any]]) -> list:
        """Differences of <w_j, F_m> along t_j in each argument, in float64.

        ``F(args)`` (compiled once) returns a tuple of outputs F_m (pytrees);
        ``weights[m][j]`` weighs F_m along direction j (c_j for f, u_j for
        B[f, .](v0)). F is evaluated at x +- h_k t_j, with h_k = h 10^-k,
        k < 4, and h = fd_step * max(1, max |x|).

        Returns, per output m and per differentiable argument, numpy arrays
        (E, S, forward, backward, S1): E[j, k] the central difference
        <w_j, F_m(x + h_k t_j) - F_m(x - h_k t_j)> / (2 h_k); S[j, k] the same
        sum over absolute terms (the scale that cancellation hides); the
        one-sided slopes at the finest step and their scale S1[j].
        """
        def leaves(tree):
            return [_f64(y) for y in jax.tree_util.tree_leaves(tree)]

        def dot(w, d):
            return sum(float(np.sum(a * b)) for a, b in zip(w, d))

        def size(w, d):
            return sum(float(np.sum(np.abs(a * b))) for a, b in zip(w, d))

        with _x64():
            base = [leaves(y) for y in F(args64)]
            W = [[leaves(w) for w in ws] for ws in weights]
            probes = [[] for _ in weights]
            for p, i in enumerate(self.diff):
                info = self.infos[i]
                xs = [_f64(info.leaves[k]) for k in info.floats]
                big = max(float(np.abs(x).max(initial=0.0)) for x in xs)
                h = self.fd_step * max(1.0, big) * 10.0 ** -np.arange(_FD_LEVELS)
                E = np.zeros((len(weights), self.n, _FD_LEVELS))
                S = np.zeros_like(E)
                one_sided = np.zeros((len(weights), 3, self.n))
                for j in range(self.n):
                    for k in range(_FD_LEVELS):
                        outs = []
                        for step in (h[k], -h[k]):
                            a = list(args64)
                            a[i] = info.with_floats([_put(x + step * t)
                                                     for x, t in zip(xs, self.T[p][j])])
                            outs.append([leaves(y) for y in F(tuple(a))])
                        for m in range(len(weights)):
                            delta = [u - d for u, d in zip(outs[0][m], outs[1][m])]
                            E[m, j, k] = dot(W[m][j], delta) / (2 * h[k])
                            S[m, j, k] = size(W[m][j], delta) / (2 * h[k])
                    for m in range(len(weights)):   # one-sided, at the finest step
                        rise = [u - b for u, b in zip(outs[0][m], base[m])]
                        fall = [b - d for d, b in zip(outs[1][m], base[m])]
                        one_sided[m, :, j] = (
                            dot(W[m][j], rise) / h[-1], dot(W[m][j], fall) / h[-1],
                            max(size(W[m][j], rise), size(W[m][j], fall)) / h[-1])
                for m in range(len(weights)):
                    probes[m].append((E[m], S[m], *one_sided[m]))
            return probes

    def fd_levels(self, probe_p) -> list[int | str]:
        """Per direction: the step level to trust, or ``"kink"`` / ``"unsettled"``.

        A direction along which the one-sided slopes at the finest step
        disagree crosses a kink (f is not differentiable there). Otherwise the
        first step whose central difference agrees with the next finer one is
        trusted: level 0 away from kinks, a finer one close to a kink.
        """
        E, S, fw, bw, S1 = probe_p
        levels: list[int | str] = []
        for j in range(self.n):
            if abs(fw[j] - bw[j]) > _KINK * S1[j]:
                levels.append("kink")
                continue
            level = next((k for k in range(_FD_LEVELS - 1)
                          if abs(E[j, k] - E[j, k + 1])
                          <= _FD_CONVERGED * max(S[j, k], S[j, k + 1])), None)
            levels.append("unsettled" if level is None else level)
        return levels

    def note_kinks(self, probe) -> None:
        """Remember the arguments at a kink, for the notes of the reference rows."""
        for p, i in enumerate(self.diff):
            kinks = self.fd_levels(probe[p]).count("kink")
            if kinks:
                self.kinks[i] = (f"at a kink ({kinks}/{self.n} directions): the "
                                 f"reference's convention decides")

    def fd_rows(self, transform: str, probe, got: Sequence[Cotangents]) -> None:
        """The dot-product test per argument: <J t_j, c_j> vs <t_j, B(c_j)>."""
        tol = self.tol
        for p, i in enumerate(self.diff):
            E, S = probe[p][0], probe[p][1]
            levels = self.fd_levels(probe[p])
            worst_abs, worst_rel, where, passed = 0.0, 0.0, "", True
            rtol_used = max(tol.rtol, self.fd_rtol)
            for j, level in enumerate(levels):
                if isinstance(level, str):
                    continue
                estimate = E[j, level]
                leaves = [_f64(x) for x in got[j][p]]
                side = sum(float(np.sum(t * x)) for t, x in zip(self.T[p][j], leaves))
                size = sum(float(np.sum(np.abs(t * x))) for t, x in zip(self.T[p][j], leaves))
                if math.isfinite(side):
                    err, scale = abs(side - estimate), max(S[j, level], size, abs(estimate))
                else:
                    err, scale = math.inf, S[j, level]
                rtol_j = max(tol.rtol, self.fd_rtol * 10.0 ** level)
                rtol_used = max(rtol_used, rtol_j)
                rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
                passed &= err <= tol.atol + rtol_j * scale
                if rel > worst_rel or not where:
                    worst_abs, worst_rel, where = err, rel, f"dir {j + 1}"
            notes = []
            for status, text in (("kink", "kink: f is not differentiable along direction(s) "
                                           "{} of {}, left out"),
                                 ("unsettled", "finite differences did not settle along "
                                               "direction(s) {} of {}, left out")):
                bad = [str(j + 1) for j, level in enumerate(levels) if level == status]
                if bad:
                    notes.append(text.format(", ".join(bad), self.n))
            near = [str(j + 1) for j, level in enumerate(levels)
                    if not isinstance(level, str) and level > 0]
            if near:
                notes.append(f"near a kink: step reduced along direction(s) {', '.join(near)}")
            if not where:
                worst_abs = worst_rel = math.nan
            self.rows.append(VJPCheck(self.infos[i].name, transform, "finite diff", worst_abs,
                                      worst_rel, where, rtol_used, tol.atol, passed,
                                      "; ".join(notes)))

    # --- the matrix -----------------------------------------------------------

    def run(self) -> None:
        """Every transform, oracle and property, appending rows to ``self.rows``."""
        n, C, args, fk, sel, transforms = (self.n, self.C, self.args, self.fk, self.sel,
                                           self.transforms)
        # B at each c_j (and f and the primal output), the loop of the batched checks.
        core_out = self.attempt("jit" if self.jit else "eager",
                                lambda: [self.core(args, c) for c in C])
        loop = [r[2] for r in core_out] if core_out is not None else None
        second = "2nd order" in transforms and loop is not None
        U = [self.u_like(loop[0], j) for j in range(n)] if second else None

        # The oracles first: finite differences find the kinks the notes mention.
        with _x64():
            args64 = self.args64()
            C64 = [_to64(c) for c in C]
            v064 = _to64(self.v0)
            U64 = [_to64(u) for u in U] if second else None

        def fd():
            weights = [C64, U64] if second else [C64]
            F = lambda a: jit_fast(_core)(fk, sel, a, v064)[::2]  # noqa: E731  (f, B(v0))
            return self.fd_probe(F, args64, weights)
        probes = self.attempt("eager", fd, "finite diff")
        fd1, fd2 = (probes[0], probes[1] if second else None) if probes else (None, None)
        if fd1 is not None:
            self.note_kinks(fd1)
        ref = None
        if self.refk is not None:
            def reference():
                refk = self.refk
                with _x64():
                    first = [_fetch(jit_fast(_core)(refk, sel, args64, c)) for c in C64]
                    grad2 = [_fetch(jit_fast(_second)(refk, sel, args64, v064, u))
                             for u in U64] if second else None
                return first[0][0], [r[2] for r in first], grad2
            ref = self.attempt("eager", reference, "reference")

        results: dict[str, list[Cotangents]] = {}
        if "eager" in transforms:
            def eager():
                _, pull = jax.vjp(fk, *args)
                return [_fetch(_select(sel, pull(c))) for c in C]
            results["eager"] = self.attempt("eager", eager)
        if self.jit:
            results["jit"] = loop
        for transform in ("eager", "jit"):
            got = results.get(transform)
            if got is None:
                continue
            if ref is not None:
                self.compare(transform, "reference", got, ref[1])
            if fd1 is not None:
                self.fd_rows(transform, fd1, got)

        C_stack = _stack(C)
        members = _stack(self.members)
        batched = {
            "vmap": lambda: _batched_v(fk, sel, args, C_stack),
            "jit(vmap)": lambda: jit_fast(_batched_v)(fk, sel, args, C_stack),
            "vmap(inputs)": lambda: _batched_inputs(fk, sel, members, C_stack),
            "jit(vmap(inputs))": lambda: jit_fast(_batched_inputs)(fk, sel, members, C_stack),
        }
        member_loop = None
        for transform, compute in batched.items():
            if transform not in transforms:
                continue
            got = self.attempt(transform, lambda compute=compute: _unstack(compute(), n))
            if got is None:
                continue
            if "inputs" in transform:
                if member_loop is None:
                    member_loop = self.attempt(transform, lambda: [
                        self.core(m, c)[2] for m, c in zip(self.members, C)], "loop")
                if member_loop is not None:
                    self.compare(transform, "loop", got, member_loop, label="member ")
            elif loop is not None:
                self.compare(transform, "loop", got, loop)

        if second:
            got = self.attempt("2nd order", lambda: [
                _fetch(jit_fast(_second)(fk, sel, args, self.v0, u)) for u in U])
            if got is not None:
                if ref is not None:
                    self.compare("2nd order", "reference", got, ref[2], label="u")
                if fd2 is not None:
                    self.fd_rows("2nd order", fd2, got)

        if core_out is not None:
            self.properties(core_out, results.get("eager"), ref)

    def properties(self, core_out: list, eager: list | None, ref) -> None:
        """Shapes and dtypes, linearity, zero, rerun, the fwd rule's primal output."""
        transform = "jit" if "jit" in self.transforms else "eager"
        args, C = self.args, self.C
        self.check_shapes("eager" if eager is not None else transform,
                          eager[0] if eager is not None else core_out[0][2])
        first = [r[2] for r in core_out]

        combo = jax.tree_util.tree_map(
            lambda a, b: _as_dtype(_LINEAR_A * _f64(a) + _LINEAR_B * _f64(b), a.dtype), C[0], C[1])
        got = self.attempt(transform, lambda: [self.core(args, combo)[2]], "linearity")
        if got is not None:
            want = [tuple(tuple(_LINEAR_A * _f64(a) + _LINEAR_B * _f64(b) for a, b in zip(x, y))
                          for x, y in zip(first[0], first[1]))]
            self.compare(transform, "linearity", got, want)

        zero = jax.tree_util.tree_map(lambda x: _as_dtype(np.zeros(x.shape), x.dtype), C[0])
        got = self.attempt(transform, lambda: [self.core(args, zero)[2]], "zero v")
        if got is not None:
            want = [tuple(tuple(np.zeros(np.shape(x)) for x in p) for p in got[0])]
            self.compare(transform, "zero v", got, want)

        again = self.attempt(transform, lambda: [self.core(args, C[0])[2]], "rerun")
        if again is not None:
            self.compare(transform, "rerun", again, first[:1])

        out, primal, _ = core_out[0]
        triples = [("{idx}", a, b) for a, b in zip(jax.tree_util.tree_leaves(primal),
                                                   jax.tree_util.tree_leaves(out))]
        self.rows.append(_row("(output)", transform, "primal", triples, self.tol,
                              "jax.vjp's primal output (the fwd rule) vs f(*args)"))
        if ref is not None:
            triples = [("{idx}", a, b) for a, b in zip(jax.tree_util.tree_leaves(out),
                                                       jax.tree_util.tree_leaves(ref[0]))]
            self.rows.append(_row("(output)", transform, "reference", triples, self.tol,
                                  "f(*args) vs reference(*args) in float64"))


def check_vjp(
    f: Callable[..., Any],
    *args: Any,
    reference: Callable[..., Any] | None = None,
    static_kwargs: Mapping[str, Any] | None = None,
    transforms: Sequence[str] | None = None,
    n_directions: int = 3,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    fd_rtol: float = FD_RTOL,
    fd_step: float = FD_STEP,
) -> VJPReport:
    """Check f's backward function B[f, z](v) = (df/dz)^T v at ``args``.

    B comes from f's own rule through ``jax.vjp`` (for a ``jax.custom_vjp``
    function, its hand-written bwd). It is run under each of ``transforms``
    and compared with ``jax.vjp`` of ``reference`` (float64), with float64
    central differences (the dot-product test <J t, c> = <t, J^T c>), with a
    loop over examples for the batched transforms, and checked for the
    properties of a backward function (linear in v, B(0) = 0, cotangent
    shapes and dtypes, the fwd rule's primal output, determinism). See the
    module docstring for the oracles, the kink handling and the tolerance table.

    Example::

        report = fnbp.check_vjp(fnbp.mm, z, W, b, reference=lambda z, W, b: z @ W.T + b)
        print(report)
        report.assert_ok()

    Args:
      f: the function to check, e.g. a ``jax.custom_vjp`` function or a
        function built from such rules. Its outputs must be floating arrays (a
        pytree of them).
      *args: the point z: positional arguments of ``f``, pytrees of arrays.
        Integer leaves get no cotangent (float0) and no rows.
      reference: a plain implementation of the same function with the same
        signature, differentiated by autodiff as the oracle. ``None``: finite
        differences only.
      static_kwargs: keyword settings passed, never traced, to ``f`` and
        ``reference`` (``functools.partial`` does the same).
      transforms: a subset of :data:`TRANSFORMS` (default: all).
      n_directions: cotangents v_j and directions t_j drawn (at least 2).
      seed: seed of those random draws (numpy; results are reproducible).
      rtol: relative tolerance; default from :data:`DEFAULT_TOLERANCES`
        for the coarsest floating dtype of the inputs and outputs.
      atol: absolute tolerance; default from the same table.
      fd_rtol: relative tolerance of the float64 finite differences.
      fd_step: central-difference step relative to max(1, max |x|).

    Returns:
      A :class:`VJPReport`; nothing is raised for a wrong B: call
      :meth:`VJPReport.assert_ok` for that.

    Raises:
      TypeError: f or reference not callable, a non-array leaf in args, a
        non-floating output of f.
      ValueError: f (or reference) rejects args, the reference's output has
        another structure or shape than f's, no floating argument to check,
        an unknown transform.
    """
    fn = "check_vjp"
    if not callable(f):
        raise TypeError(f"{fn}: f must be callable, got {type(f).__name__}")
    if reference is not None and not callable(reference):
        raise TypeError(f"{fn}: reference must be callable or None, "
                        f"got {type(reference).__name__}")
    if static_kwargs is not None and not isinstance(static_kwargs, Mapping):
        raise TypeError(f"{fn}: static_kwargs must be a dict of keyword settings, "
                        f"got {type(static_kwargs).__name__}")
    transforms = TRANSFORMS if transforms is None else tuple(transforms)
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"{fn}: unknown transform(s) {unknown}; choose from {list(TRANSFORMS)}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 2:
        raise ValueError(f"{fn}: n_directions must be an int >= 2, got {n_directions!r}")

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
            f"{name} accepts (static settings go in static_kwargs)") from err
    out_structs, out_treedef = jax.tree_util.tree_flatten(out_shape)
    if not out_structs:
        raise ValueError(f"{fn}: {name} returns no array, there is nothing to differentiate")
    for leaf in out_structs:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: {name} returns a {leaf.dtype} output; check_vjp needs floating "
                f"outputs (wrap f so it returns only its floating outputs)")
    if refk is not None:
        try:
            ref_shape = jax.eval_shape(refk, *args)
        except Exception as err:
            raise ValueError(f"{fn}: reference(*args) raised {type(err).__name__}: {err}; "
                             f"the reference must take f's arguments") from err
        ref_structs, ref_treedef = jax.tree_util.tree_flatten(ref_shape)
        shapes = [tuple(s.shape) for s in out_structs]
        ref_shapes = [tuple(s.shape) for s in ref_structs]
        if ref_treedef != out_treedef or ref_shapes != shapes:
            show = (lambda s: s[0] if len(s) == 1 else s)  # noqa: E731
            raise ValueError(
                f"{fn}: the reference returns shape {show(ref_shapes)} but {name} returns "
                f"shape {show(shapes)} for the same arguments; the reference must compute "
                f"the same function as f")

    diff = [k for k, info in enumerate(infos) if info.floats]
    if not diff:
        raise ValueError(f"{fn}: no argument of {name} has a floating leaf, so there is "
                         f"no cotangent to check")
    dtype = _coarsest([info.leaves[k].dtype for info in infos for k in info.floats]
                      + [s.dtype for s in out_structs])
    default = DEFAULT_TOLERANCES.get(dtype.name, DEFAULT_TOLERANCES["float32"])
    tol = Tolerance(default.rtol if rtol is None else rtol,
                    default.atol if atol is None else atol)

    checker = _Checker(fk, refk, args, infos, diff, out_structs, out_treedef, tol, fd_rtol,
                       fd_step, n_directions, seed, transforms)
    checker.run()
    notes = []
    if not _uses_custom_vjp(jaxpr.jaxpr):
        notes.append(f"{name} has no jax.custom_vjp rule: its derivative comes from autodiff")
    if checker.kinks:
        notes.append("at a kink: " + ", ".join(infos[i].name for i in checker.kinks)
                     + " (finite differences leave those directions out)")
    return VJPReport(name, dtype.name, jax.default_backend(), tuple(checker.rows), tuple(notes))
