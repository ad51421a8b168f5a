"""The checker: one call of check_vjp, its random draws, programs and rows."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fnbp.verify.arguments import _Arg, _as_dtype, _fetch, _put, _stack, _to64, _unstack
from fnbp.verify.diagnose import (
    cotangent_mismatch,
    error_note,
    explain,
    raised_at,
    rule_location,
    swapped,
)
from fnbp.verify.finite_diff import _FiniteDifferences
from fnbp.verify.kinks import _Kinks
from fnbp.verify.probes import fits, fixed_probes, inspect_function, large_factors, offset, scaled
from fnbp.verify.programs import (
    _B,
    Cotangents,
    Selection,
    _batched_inputs,
    _batched_v,
    _core,
    _second,
    _select,
    _x64,
    jit_fast,
)
from fnbp.verify.report import Tolerance, VJPCheck, _f64, _row
from fnbp.verify.round_off import sampled

_PERTURBATION = 0.05  # vmap(inputs): member m is x (1 + 0.05 u), u uniform in [-1, 1]
_LINEAR_A, _LINEAR_B = 0.5, -2.0
_ROUND_OFF = 4.0  # allowance for the reference's own round-off below float64


class _Checker(_FiniteDifferences, _Kinks):
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

    def __init__(
        self,
        fk,
        refk,
        args: tuple,
        infos: list[_Arg],
        diff: list[int],
        out_structs: list,
        out_treedef,
        tol: Tolerance,
        fd_rtol: float,
        fd_step: float,
        n: int,
        seed: int,
        transforms: Sequence[str],
        dtype: Any = np.float64,
        probe_kinds: Sequence[str] = (),
        kink_policy: str = "reference",
    ):
        self.fk, self.refk, self.args, self.infos, self.diff = fk, refk, args, infos, diff
        self.tol, self.fd_rtol, self.fd_step, self.n = tol, fd_rtol, fd_step, n
        self.transforms, self.dtype, self.seed = transforms, dtype, seed
        self.probe_kinds = tuple(probe_kinds)
        self.kink_policy = kink_policy
        self.probed: list[str] = []
        self.sel: Selection = tuple((i, infos[i].floats) for i in diff)
        self.rows: list[VJPCheck] = []
        self._errors: dict[tuple[str, str], tuple[int, str, list[str]]] = {}
        self._account: tuple[str, str] | None = None
        self.kinks: dict[int, str] = {}
        rng = np.random.default_rng(seed)

        def draw_output():
            return out_treedef.unflatten(
                [_as_dtype(rng.standard_normal(s.shape), s.dtype) for s in out_structs]
            )

        self.C = [draw_output() for _ in range(n)]
        self.v0 = draw_output()
        self.T = [
            [
                self._unit([rng.standard_normal(infos[i].leaves[k].shape) for k in infos[i].floats])
                for _ in range(n)
            ]
            for i in diff
        ]
        self.U = [
            tuple(
                tuple(rng.standard_normal(infos[i].leaves[k].shape) for k in infos[i].floats)
                for i in diff
            )
            for _ in range(n)
        ]
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

    def args64(self, point: tuple | None = None) -> tuple:
        """The arguments (or a probe point) with every floating leaf up-cast to float64."""
        out = []
        for i, info in enumerate(self.infos):
            leaves = info.leaves if point is None else jax.tree_util.tree_leaves(point[i])
            out.append(info.with_floats([_put(_f64(leaves[k])) for k in info.floats]))
        return tuple(out)

    def u_like(self, cotangents: Cotangents, j: int) -> Cotangents:
        """The j-th 2nd-order weight u_j, in the dtypes B returns."""
        return tuple(
            tuple(_as_dtype(u, np.asarray(s).dtype) for u, s in zip(us, ss))
            for us, ss in zip(self.U[j], cotangents)
        )

    # --- rows -----------------------------------------------------------------

    def attempt(self, transform: str, fn: Callable[[], Any], oracle: str = "runs", probe: str = ""):
        """``fn()``, or ``None`` and a failing row naming the exception.

        One exception is one row: the same error under another transform adds
        that transform to the row's note instead of another row.
        """
        try:
            return fn()
        except Exception as err:  # any failure of f under a transform is a finding
            self._record_error(transform, oracle, err, probe)
            return None

    def _record_error(
        self, transform: str, oracle: str, err: BaseException, probe: str = ""
    ) -> None:
        key = (type(err).__name__, re.sub(r"b?float\d+", "float", " ".join(str(err).split())))
        if key in self._errors:
            index, note, seen = self._errors[key]
            if transform not in seen and transform != self.rows[index].transform:
                seen.append(transform)
                self.rows[index] = dataclasses.replace(
                    self.rows[index], note=f"{note}; also under {', '.join(seen)}"
                )
            return
        if self._account is None:
            self._account = cotangent_mismatch(
                self.fk.f,
                dict(self.fk.kwargs),
                self.args,
                self.C[0],
                [info.name for info in self.infos],
            )
        name, account = self._account
        where = raised_at(err) or rule_location(self.fk.f)
        note = error_note(err, where)
        self._errors[key] = (len(self.rows), note, [])
        self.rows.append(
            VJPCheck(
                name or "(all)",
                transform,
                oracle,
                math.nan,
                math.nan,
                "",
                self.tol.rtol,
                self.tol.atol,
                False,
                note,
                probe,
                diagnosis=account or f"raised {type(err).__name__}",
            )
        )

    def compare(
        self,
        transform: str,
        oracle: str,
        got: Sequence[Cotangents],
        want: Sequence[Cotangents],
        label: str = "v",
        note: str = "",
        probe: str = "",
        point: tuple | None = None,
        tols: Sequence[Tolerance] | None = None,
        why: str = "",
    ) -> None:
        """One row per differentiable argument: got[j] against want[j], all j.

        ``point``: the arguments B was taken at (for the sign diagnosis);
        ``tols``: per differentiable argument, a tolerance other than the
        check's own; ``why``: the diagnosis of a failing row (default: from
        the numbers, see :func:`fnbp.verify.diagnose.explain`).
        """
        point = self.args if point is None else point
        rows = []
        for p, i in enumerate(self.diff):
            info = self.infos[i]
            triples = []
            for j, (g, w) in enumerate(zip(got, want)):
                suffix = f" {label}{j + 1}" if len(got) > 1 else ""
                for k, gl, wl in zip(info.floats, g[p], w[p]):
                    path = info.paths[k].replace("{", "{{").replace("}", "}}")
                    triples.append((path + "{idx}" + suffix, gl, wl))
            tol = self.tol if tols is None else tols[p]
            kink = self.kinks.get(i, "") if oracle == "reference" and not probe else ""
            row = _row(
                info.name,
                transform,
                oracle,
                triples,
                tol,
                "; ".join(x for x in (kink, note) if x),
                probe,
            )
            if (
                not row.passed
                and oracle == "reference"
                and transform != "2nd order"
                and self.refk is not None
                and not row.diagnosis
            ):
                row = self.attempt_kinks(row, p, i, got, want, point, tol, triples)
            if row.diagnosis.startswith("NaN at index"):
                bad = [
                    (k, g[p][n])
                    for g, w in zip(got, want)
                    for n, k in enumerate(info.floats)
                    if (np.isnan(_f64(g[p][n])) & ~np.isnan(_f64(w[p][n]))).any()
                ]
                row = dataclasses.replace(
                    row, diagnosis=row.diagnosis + self._nan_value(info, point[i], bad)
                )
            elif not row.passed and why:
                row = dataclasses.replace(row, diagnosis=why)
            elif not row.passed and not row.diagnosis:
                z = jax.tree_util.tree_leaves(point[i])
                row = dataclasses.replace(
                    row,
                    diagnosis=explain(
                        [g for _, g, _ in triples],
                        [w for _, _, w in triples],
                        [np.asarray(z[k]) for _ in got for k in info.floats],
                        [info.paths[k] for _ in got for k in info.floats],
                        tol.rtol,
                    ),
                )
            rows.append(row)
        self._swaps(rows, got, want)
        self.rows.extend(rows)

    @staticmethod
    def _nan_value(info: _Arg, point: Any, bad: list) -> str:
        """`` where z[i] = value``: the argument's entry at B's first NaN, when shapes agree."""
        if not bad:
            return ""
        k, ct = bad[0]
        leaf = np.asarray(jax.tree_util.tree_leaves(point)[k])
        ct = _f64(ct)
        if leaf.shape != ct.shape:
            return ""
        idx = np.unravel_index(int(np.argmax(np.isnan(ct))), ct.shape)
        where = f"[{', '.join(str(int(i)) for i in idx)}]" if idx else ""
        return f" where {info.name}{info.paths[k]}{where} = {float(leaf[idx]):.3g}"

    def _swaps(self, rows: list[VJPCheck], got, want) -> None:
        """Name two failing arguments that hold each other's cotangents."""

        def leaves(trees, p):
            return [x for tree in trees for x in tree[p]]

        failing = [p for p, row in enumerate(rows) if not row.passed]
        for a in failing:
            for b in failing:
                if a < b and swapped(
                    [leaves(got, a), leaves(got, b)],
                    [leaves(want, a), leaves(want, b)],
                    self.tol.rtol,
                ):
                    text = (
                        f"the cotangents of {rows[a].argument} and {rows[b].argument} look swapped"
                    )
                    for p in (a, b):
                        rows[p] = dataclasses.replace(rows[p], diagnosis=text)

    def check_shapes(self, transform: str, got: Cotangents) -> None:
        for p, i in enumerate(self.diff):
            info = self.infos[i]
            bad = []
            for k, ct in zip(info.floats, got[p]):
                leaf = info.leaves[k]
                if np.shape(ct) != leaf.shape or np.asarray(ct).dtype != leaf.dtype:
                    bad.append(
                        f"{info.paths[k] or info.name}: cotangent "
                        f"{np.asarray(ct).dtype}{list(np.shape(ct))} for primal "
                        f"{leaf.dtype}{list(leaf.shape)}"
                    )
            err = math.inf if bad else 0.0
            self.rows.append(
                VJPCheck(
                    info.name,
                    transform,
                    "shape/dtype",
                    err,
                    err,
                    "",
                    0.0,
                    0.0,
                    not bad,
                    "; ".join(bad),
                    diagnosis="a cotangent of the wrong shape or dtype" if bad else "",
                )
            )

    # --- the matrix -----------------------------------------------------------

    def run(self) -> None:
        """Every transform, oracle and property, appending rows to ``self.rows``."""
        n, C, args, fk, sel, transforms = (
            self.n,
            self.C,
            self.args,
            self.fk,
            self.sel,
            self.transforms,
        )
        # B at each c_j (and f and the primal output), the loop of the batched checks.
        core_out = self.attempt(
            "jit" if self.jit else "eager", lambda: [self.core(args, c) for c in C]
        )
        loop = [r[2] for r in core_out] if core_out is not None else None
        second = "2nd order" in transforms and loop is not None
        U = [self.u_like(loop[0], j) for j in range(n)] if second and loop is not None else []

        # The oracles first: finite differences find the kinks the notes mention.
        with _x64():
            args64 = self.args64()
            C64 = [_to64(c) for c in C]
            v064 = _to64(self.v0)
            U64 = [_to64(u) for u in U]

        def fd():
            weights = [C64, U64] if second else [C64]
            return self.fd_probe(F, args64, weights)

        def F(a):  # f and B(v0), in float64
            return jit_fast(_core)(fk, sel, a, v064)[::2]

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
                    grad2 = (
                        [_fetch(jit_fast(_second)(refk, sel, args64, v064, u)) for u in U64]
                        if second
                        else None
                    )
                return first[0][0], [r[2] for r in first], grad2

            ref = self.attempt("eager", reference, "reference")

        results: dict[str, list[Cotangents] | None] = {}
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
        batched = {  # each unstacked into its n members' cotangents
            "vmap": lambda: _unstack(_batched_v(fk, sel, args, C_stack), n),
            "jit(vmap)": lambda: _unstack(jit_fast(_batched_v)(fk, sel, args, C_stack), n),
            "vmap(inputs)": lambda: _unstack(_batched_inputs(fk, sel, members, C_stack), n),
            "jit(vmap(inputs))": lambda: _unstack(
                jit_fast(_batched_inputs)(fk, sel, members, C_stack), n
            ),
        }
        member_loop = None
        for transform, compute in batched.items():
            if transform not in transforms:
                continue
            got = self.attempt(transform, compute)
            if got is None:
                continue
            if "inputs" in transform:
                if member_loop is None:
                    member_loop = self.attempt(
                        transform,
                        lambda: [self.core(m, c)[2] for m, c in zip(self.members, C)],
                        "loop",
                    )
                if member_loop is not None:
                    self.compare(transform, "loop", got, member_loop, label="member ")
            elif loop is not None:
                self.compare(transform, "loop", got, loop)

        if second:
            got = self.attempt(
                "2nd order",
                lambda: [_fetch(jit_fast(_second)(fk, sel, args, self.v0, u)) for u in U],
            )
            if got is not None:
                if ref is not None:
                    self.compare_with_round_off(
                        "2nd order",
                        got,
                        ref[2],
                        lambda: [
                            _fetch(jit_fast(_second)(self.refk, sel, args, self.v0, u)) for u in U
                        ],
                        lambda: [
                            _fetch(
                                sampled(
                                    _second,
                                    self.refk,
                                    sel,
                                    (args64, v064, u),
                                    self.dtype,
                                    self.seed + j,
                                    jit_fast,
                                )
                            )
                            for j, u in enumerate(U64)
                        ],
                        label="u",
                    )
                if fd2 is not None:
                    self.fd_rows("2nd order", fd2, got)

        if core_out is not None:
            self.properties(core_out, results.get("eager"), ref)
        if core_out is not None and self.probe_kinds and (ref is not None or fd1 is not None):
            self.run_probes("jit" if self.jit else "eager", C64, F if ref is None else None)

    def compare_with_round_off(
        self,
        transform: str,
        got: list,
        want: list,
        low: Callable[[], list],
        model: Callable[[], list],
        **kwargs: Any,
    ) -> None:
        """:meth:`compare` with the reference, allowing its own round-off below float64.

        A correct rule cannot beat the reference computed in the working
        dtype. Two estimates of that round-off, against the float64
        reference ``want``: ``low()``, the reference's program compiled at
        the working dtype (what this compiler makes of it), and ``model()``,
        Monte Carlo arithmetic on the reference's program in float64 (every
        rounding operation perturbed by up to the dtype's epsilon, see
        :mod:`fnbp.verify.round_off`: what an evaluation of its algorithm in
        that dtype may be off by, on any compiler). Each argument's atol
        grows by _ROUND_OFF times the larger. ``model()`` compiles one more
        program, so it is asked only when the rows fail without it (with it
        the tolerance only grows: a row that passes without it passes with
        it). In float64 the plain tolerance applies.
        """
        if np.dtype(self.dtype) == np.float64 or self.refk is None:
            self.compare(transform, "reference", got, want, **kwargs)
            return
        estimates: list = []
        for estimate, context in ((low, contextlib.nullcontext), (model, _x64)):
            try:
                with context():
                    estimates.append(estimate())
            except Exception:  # noqa: BLE001 - no such estimate: the other one applies
                pass
            start = len(self.rows)
            tols, note = self._round_off(estimates, want)
            self.compare(transform, "reference", got, want, tols=tols, note=note, **kwargs)
            if estimate is model or all(row.passed for row in self.rows[start:]):
                return
            del self.rows[start:]

    def _round_off(self, estimates: list, want: list) -> tuple[list[Tolerance] | None, str]:
        """Per argument, the tolerance with _ROUND_OFF times the largest estimated round-off."""
        if not estimates:
            return None, ""
        tols, widest = [], 0.0
        for p in range(len(self.diff)):
            floor = 0.0
            for lo in estimates:
                for a, b in zip(lo, want):
                    for x, y in zip(a[p], b[p]):
                        d = np.abs(_f64(x) - _f64(y))  # x may hold samples: a leading axis
                        d = d[np.isfinite(d)]
                        floor = max(floor, float(d.max(initial=0.0)))
            widest = max(widest, floor)
            tols.append(Tolerance(self.tol.rtol, self.tol.atol + _ROUND_OFF * floor))
        note = (
            (
                f"atol includes {_ROUND_OFF:g}x the reference's own {np.dtype(self.dtype).name} "
                f"round-off here ({widest:.1e})"
            )
            if _ROUND_OFF * widest > self.tol.atol
            else ""
        )
        return tols, note

    # --- probes ---------------------------------------------------------------

    def run_probes(self, transform: str, C64: list, F: Callable | None) -> None:
        """B at the probe points (see :mod:`fnbp.verify.probes`), one row per argument each.

        With a reference, B is compared with it (float64) at each probe; else
        (``F`` given) with finite differences of f. The programs are the
        check's own: same shapes, nothing new to compile.
        """
        kinds, sel = self.probe_kinds, self.sel
        oracle_fn = self.refk if self.refk is not None else self.fk
        kinks: list[float] = []
        max_like = False
        if "kinks" in kinds or "ties" in kinds:
            kinks, max_like = inspect_function(oracle_fn, self.args)
        rng = np.random.default_rng(self.seed + 1)
        points = fixed_probes(self.infos, self.diff, kinks, max_like, kinds, rng)

        def at64(point, c):  # the oracle function at a probe, in float64
            with _x64():
                return _fetch(jit_fast(_core)(oracle_fn, sel, self.args64(point), c))

        def usable(point) -> bool:
            # The oracle must stay finite in the working dtype (its cotangents too, for
            # a reference; f's own B is what is being checked, so only f's output counts).
            try:
                out = _fetch(jit_fast(_core)(oracle_fn, sel, point, self.C[0]))
            except Exception:  # noqa: BLE001 - a probe the oracle cannot take is skipped
                return False
            values = [*jax.tree_util.tree_leaves(out[0])]
            if self.refk is not None:
                values += jax.tree_util.tree_leaves(out[2])
            return fits(values, self.dtype)

        if "large" in kinds:
            for factor in large_factors(self.dtype):
                point = scaled(self.infos, self.diff, factor)
                if point is not None and usable(point):
                    points.append((f"large x{factor:.0e}", point))
                    break
        if "offset" in kinds:
            shifted = offset(self.infos, self.diff, self.tol.rtol)
            if shifted is not None and usable(shifted[1]):
                points.append(shifted)

        def at_probe(name: str, point: tuple) -> None:  # B there, compared with the oracle
            got = self.attempt(
                transform, lambda: [self.core(point, c)[2] for c in self.C], probe=name
            )
            if got is None:
                return
            self.probed.append(name)
            if F is None:
                want = self.attempt(
                    "eager",
                    lambda: [at64(point, c)[2] for c in C64],
                    "reference",
                    probe=name,
                )
                if want is not None and name.startswith(("large", "offset")):
                    self.compare_with_round_off(
                        transform,
                        got,
                        want,
                        lambda: [
                            _fetch(jit_fast(_core)(self.refk, sel, point, c))[2] for c in self.C
                        ],
                        lambda: [
                            _fetch(
                                sampled(
                                    _B,
                                    self.refk,
                                    sel,
                                    (self.args64(point), c),
                                    self.dtype,
                                    self.seed + j,
                                    jit_fast,
                                )
                            )
                            for j, c in enumerate(C64)
                        ],
                        probe=name,
                        point=point,
                    )
                elif want is not None:  # the caller's magnitudes: the plain tolerance
                    self.compare(transform, "reference", got, want, probe=name, point=point)
            else:
                with _x64():
                    point64 = self.args64(point)
                found = self.attempt(
                    "eager",
                    lambda: self.fd_probe(F, point64, [C64]),
                    "finite diff",
                    probe=name,
                )
                if found is not None:
                    self.fd_rows(transform, found[0], got, probe_name=name)

        for name, point in points:
            at_probe(name, point)

    def properties(self, core_out: list, eager: list | None, ref) -> None:
        """Shapes and dtypes, linearity, zero, rerun, the fwd rule's primal output."""
        transform = "jit" if "jit" in self.transforms else "eager"
        args, C = self.args, self.C
        self.check_shapes(
            "eager" if eager is not None else transform,
            eager[0] if eager is not None else core_out[0][2],
        )
        first = [r[2] for r in core_out]

        combo = jax.tree_util.tree_map(
            lambda a, b: _as_dtype(_LINEAR_A * _f64(a) + _LINEAR_B * _f64(b), a.dtype), C[0], C[1]
        )
        got = self.attempt(transform, lambda: [self.core(args, combo)[2]], "linearity")
        if got is not None:
            want = [
                tuple(
                    tuple(_LINEAR_A * _f64(a) + _LINEAR_B * _f64(b) for a, b in zip(x, y))
                    for x, y in zip(first[0], first[1])
                )
            ]
            self.compare(transform, "linearity", got, want, why="not linear in v")

        zero = jax.tree_util.tree_map(lambda x: _as_dtype(np.zeros(x.shape), x.dtype), C[0])
        got = self.attempt(transform, lambda: [self.core(args, zero)[2]], "zero v")
        if got is not None:
            want = [tuple(tuple(np.zeros(np.shape(x)) for x in p) for p in got[0])]
            self.compare(
                transform, "zero v", got, want, why="B(0) != 0: B is affine, not linear, in v"
            )

        again = self.attempt(transform, lambda: [self.core(args, C[0])[2]], "rerun")
        if again is not None:
            self.compare(
                transform, "rerun", again, first[:1], why="nondeterministic: two runs of B differ"
            )

        out, primal, _ = core_out[0]
        triples = [
            ("{idx}", a, b)
            for a, b in zip(jax.tree_util.tree_leaves(primal), jax.tree_util.tree_leaves(out))
        ]
        self.rows.append(
            _row(
                "(output)",
                transform,
                "primal",
                triples,
                self.tol,
                "jax.vjp's primal output (the fwd rule) vs f(*args)",
                diagnosis=_unless_nan(triples, "the fwd rule's output differs from f(*args)"),
            )
        )
        if ref is not None:
            triples = [
                ("{idx}", a, b)
                for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref[0]))
            ]
            self.rows.append(
                _row(
                    "(output)",
                    transform,
                    "reference",
                    triples,
                    self.tol,
                    "f(*args) vs reference(*args) in float64",
                    diagnosis=_unless_nan(
                        triples, "f and the reference compute different functions"
                    ),
                )
            )


def _unless_nan(triples, text: str) -> str:
    """``text``, unless a NaN in the compared values says more (the row names it then)."""
    return "" if any(np.isnan(_f64(got)).any() for _, got, _ in triples) else text
