"""The checker: one call of check_vjp, its random draws, programs and rows."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from fnbp.verify.arguments import _Arg, _as_dtype, _fetch, _put, _stack, _to64, _unstack
from fnbp.verify.finite_diff import _FiniteDifferences
from fnbp.verify.programs import (Cotangents, Selection, _batched_inputs, _batched_v, _core,
                                  _second, _select, _x64, jit_fast)
from fnbp.verify.report import Tolerance, VJPCheck, _error_row, _f64, _row

_PERTURBATION = 0.05        # vmap(inputs): member m is x (1 + 0.05 u), u uniform in [-1, 1]
_LINEAR_A, _LINEAR_B = 0.5, -2.0


class _Checker(_FiniteDifferences):
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

