"""Kink conventions: a rule that differs from the reference only where f has a kink.

At a kink (|z| at 0, relu at 0, a clip at its bound, a tie in a max) f has no
derivative, and any value between its one-sided derivatives is a valid
choice (a Clarke subgradient): d|z|/dz at 0 may be -1, 0, 1 or anything
between. The reference's autodiff takes one convention; a rule that takes
another is not wrong the way a rule off by a factor is. So a failing
first-order ``reference`` row is examined entry by entry, worst first:

- at each entry where B differs from the reference, the one-sided
  derivatives of g_j(x) = <c_j, f(x)> along that coordinate are estimated by
  one-sided float64 differences of the reference (Richardson-extrapolated
  from steps h and h/2, h = fd_step max(1, max |x|)); the entry is at a kink
  when they differ, and B's value there must lie between them;
- entries at kinks that move the same outputs are coupled (the tied entries
  of a max; the entries of the same value as a differing entry are examined
  too, so that a tie's other members are found). For such a group the
  interval of each entry is not enough: a max that hands every tied entry
  the whole cotangent is inside [0, v] at each entry, yet gives it out
  twice. So B on the group must lie in the convex hull of the reference's
  gradients at :data:`_SAMPLES` nearby points x + h r per entry (r random
  over the group, where f is differentiable): the Clarke subdifferential,
  seen from inside.

When every differing entry passes, the row is a convention difference: with
``kinks="reference"`` it fails with the diagnosis "differs from the
reference's convention at the kink z=0 (yours 0, reference 1; one-sided
derivatives -1 and 1)" (the values B gives for an all-ones cotangent, the
derivative of an elementwise f; the cotangent's own when they agree there);
with ``kinks="any_subgradient"`` the entry is compared with the interval
instead, and the row passes. The first entry that is smooth, or whose value
lies outside, ends the examination: the row keeps its failure and its usual
diagnosis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from fnbp.verify.arguments import _Arg, _as_dtype, _fetch, _put
from fnbp.verify.programs import Selection, _Bound, _core, _x64, jit_fast
from fnbp.verify.report import VJPCheck, _f64, _index, _row

_MAX_ENTRIES = 256  # more entries than this to examine: not "only at a kink"
_GAP = 1e-3  # one-sided derivatives this far apart (relative): a kink
_SAMPLES = 8  # nearby gradients per entry of a coupled group
_EPS = float(np.finfo(np.float64).eps)

Entry = tuple[int, int]  # (floating leaf of the argument, flat index)


class _Kinks:
    """Kink conventions for :class:`fnbp.verify.checker._Checker` (a mixin).

    Uses the checker's ``refk``, ``sel``, ``infos``, ``C``, ``fd_step``,
    ``seed``, ``kink_policy``, ``args64`` and ``core``. Every evaluation
    runs the reference's float64 program that the check has compiled.
    """

    # The checker's, declared here for type checkers (the checker sets them).
    refk: _Bound | None
    sel: Selection
    infos: list[_Arg]
    C: list[Any]  # the cotangents c_j, pytrees like f's output
    fd_step: float
    seed: int
    kink_policy: str

    if TYPE_CHECKING:

        def args64(self, point: tuple | None = None) -> tuple: ...

        def core(self, args: tuple, v: Any) -> Any: ...

    def attempt_kinks(self, row: VJPCheck, *args: Any) -> VJPCheck:
        """:meth:`at_kinks`, or ``row`` unchanged when the reference cannot be evaluated there."""
        try:
            return self.at_kinks(row, *args)
        except Exception:  # noqa: BLE001 - the examination is extra evidence, never a failure
            return row

    def _ref(self, point64: tuple, c: Any) -> tuple:
        """The reference's output leaves and cotangents at a float64 point."""
        with _x64():
            out, _, cts = _fetch(jit_fast(_core)(self.refk, self.sel, point64, c))
        return [_f64(y) for y in jax.tree_util.tree_leaves(out)], cts

    def _moved(self, point64: tuple, i: int, steps: Sequence[np.ndarray]) -> tuple:
        """point64 with argument i's floating leaves moved by ``steps``."""
        info = self.infos[i]
        leaves = jax.tree_util.tree_leaves(point64[i])
        a = list(point64)
        with _x64():
            a[i] = info.with_floats([_put(_f64(leaves[k]) + s) for k, s in zip(info.floats, steps)])
        return tuple(a)

    def _one_sided(
        self,
        point64: tuple,
        i: int,
        t: Sequence[np.ndarray],
        h: float,
        weights: Sequence[Sequence[np.ndarray]],
        base: list[np.ndarray],
    ):
        """(per weight w: (g'(x; t), -g'(x; -t), noise) of g = <w, f>, the outputs t moves).

        Richardson-extrapolated from the steps h and h/2; ``noise`` bounds
        the error of the estimate (its change between the steps, and the
        round-off of the differences).
        """
        outs = {
            s: self._ref(self._moved(point64, i, [s * x for x in t]), self._c64)[0]
            for s in (h, h / 2, -h, -h / 2)
        }
        moved = np.concatenate(
            [
                np.any([outs[s][m] != base[m] for s in outs], axis=0).ravel()
                for m in range(len(base))
            ]
        )
        found = []
        for w in weights:

            def g(y, w=w):
                return sum(float(np.sum(a * b)) for a, b in zip(w, y))

            g0 = g(base)
            rise = {s: (g(outs[s]) - g0) / s for s in (h, h / 2)}
            fall = {s: (g0 - g(outs[-s])) / s for s in (h, h / 2)}
            size = sum(float(np.sum(np.abs(a * b))) for a, b in zip(w, base))
            noise = (
                2 * abs(rise[h / 2] - rise[h])
                + 2 * abs(fall[h / 2] - fall[h])
                + 16 * _EPS * size / h
            )
            found.append((2 * rise[h / 2] - rise[h], 2 * fall[h / 2] - fall[h], noise))
        return found, moved

    def at_kinks(
        self,
        row: VJPCheck,
        p: int,
        i: int,
        got: Sequence,
        want: Sequence,
        point: tuple,
        tol,
        triples: list,
    ) -> VJPCheck:
        """``row`` diagnosed as a convention (or, with ``kinks="any_subgradient"``, passed)
        when it fails only at kinks, by subgradients; else ``row`` itself."""
        info = self.infos[i]
        G = [[_f64(x) for x in g[p]] for g in got]
        W = [[_f64(x) for x in w[p]] for w in want]
        if any(g.shape != w.shape for gs, ws in zip(G, W) for g, w in zip(gs, ws)):
            return row
        scale = max(
            (float(np.abs(w[np.isfinite(w)]).max(initial=0.0)) for ws in W for w in ws), default=0.0
        )
        thr = tol.atol + tol.rtol * scale
        err: dict[Entry, float] = {}  # the entries where B differs, and by how much
        for gs, ws in zip(G, W):
            for n, (gl, wl) in enumerate(zip(gs, ws)):
                d = np.abs(gl - wl).ravel()
                for e in map(int, np.flatnonzero(~(d <= thr))):
                    err[n, e] = max(err.get((n, e), 0.0), float(d[e]))
        if not err or len(err) > _MAX_ENTRIES:
            return row
        with _x64():
            point64 = self.args64(point)
            self._c64 = jax.tree_util.tree_map(lambda x: _put(_f64(x)), self.C[0])
        leaves64 = [_f64(jax.tree_util.tree_leaves(point64[i])[k]) for k in info.floats]
        h = self.fd_step * max(1.0, max(float(np.abs(x).max(initial=0.0)) for x in leaves64))
        cotangents = [[_f64(c) for c in jax.tree_util.tree_leaves(cj)] for cj in self.C]
        base = self._ref(point64, self._c64)[0]

        def unit(n: int, e: int) -> list[np.ndarray]:
            t = [np.zeros(x.shape) for x in leaves64]
            t[n].flat[e] = 1.0
            return t

        interval: dict[tuple[int, int, int], tuple[float, float]] = {}
        moves: dict[Entry, np.ndarray] = {}
        for n, e in sorted(err, key=lambda key: -err[key]):
            sides, moves[n, e] = self._one_sided(point64, i, unit(n, e), h, cotangents, base)
            for j, (forward, backward, noise) in enumerate(sides):
                g, w = float(G[j][n].flat[e]), float(W[j][n].flat[e])
                if abs(g - w) <= thr:
                    continue
                lo, hi = min(forward, backward), max(forward, backward)
                if not (math.isfinite(hi - lo) and hi - lo > _GAP * max(abs(lo), abs(hi)) + noise):
                    return row  # smooth there: a wrong value, not a convention
                if not lo - noise - thr <= g <= hi + noise + thr:
                    return row  # outside the one-sided derivatives: no subgradient
                interval[j, n, e] = (lo - noise, hi + noise)
        # The other entries of the same value (a tie's other members) that are kinks too.
        for n, x in enumerate(leaves64):
            values = [float(x.flat[e]) for (m, e) in err if m == n]
            for e in map(int, np.flatnonzero(np.isin(x, values))):
                if (n, e) in moves:
                    continue
                if len(moves) >= _MAX_ENTRIES:
                    return row
                sides, moved = self._one_sided(point64, i, unit(n, e), h, cotangents, base)
                if any(abs(f - b) > _GAP * max(abs(f), abs(b)) + noise for f, b, noise in sides):
                    moves[n, e] = moved
        for group in _coupled(moves):
            if (
                len(group) > 1
                and any(key in err for key in group)
                and not self._in_hull(point64, p, i, leaves64, group, G, h, thr)
            ):
                return row
        return self._kink_row(
            row, p, i, point, point64, leaves64, err, G, W, interval, base, h, tol, triples
        )

    def _in_hull(
        self,
        point64: tuple,
        p: int,
        i: int,
        leaves64: list,
        group: list[Entry],
        G: list,
        h: float,
        thr: float,
    ) -> bool:
        """B(c_j) on a coupled group lies in the hull of the reference's nearby gradients."""
        from scipy.optimize import nnls  # scipy comes with jax

        rng = np.random.default_rng(self.seed + 3)
        with _x64():
            C64 = [jax.tree_util.tree_map(lambda x: _put(_f64(x)), c) for c in self.C]
        samples: list[list[list[float]]] = [[] for _ in C64]
        for _ in range(_SAMPLES * len(group)):
            r = [np.zeros(x.shape) for x in leaves64]
            for n, e in group:
                r[n].flat[e] = rng.standard_normal()
            near = self._moved(point64, i, [h * x for x in r])
            for j, c in enumerate(C64):
                cts = self._ref(near, c)[1]
                samples[j].append([float(_f64(cts[p][n]).flat[e]) for (n, e) in group])
        for j, rows in enumerate(samples):
            S = np.asarray(rows).T  # (entries, samples)
            b = np.asarray([float(G[j][n].flat[e]) for (n, e) in group])
            weight = 1e3 * max(1.0, float(np.abs(S).max(initial=0.0)))
            lam, _ = nnls(np.vstack([S, np.full((1, S.shape[1]), weight)]), np.append(b, weight))
            if float(np.abs(S @ lam - b).max(initial=0.0)) > thr + 1e-9 * max(
                1.0, float(np.abs(b).max(initial=0.0))
            ):
                return False
        return True

    def _kink_row(
        self, row, p, i, point, point64, leaves64, err, G, W, interval, base, h, tol, triples
    ) -> VJPCheck:
        """The row with its diagnosis, or compared with the one-sided intervals."""
        info = self.infos[i]
        n, e = max(err, key=lambda key: err[key])
        leaf = leaves64[n]
        name = f"{info.name}{info.paths[info.floats[n]]}"
        at = f"{name}{_index(np.unravel_index(e, leaf.shape)) if leaf.ndim else ''}"
        t = [np.zeros(x.shape) for x in leaves64]
        t[n].flat[e] = 1.0
        try:  # the values for an all-ones cotangent: the derivative of an elementwise f
            ones = jax.tree_util.tree_map(
                lambda x: _as_dtype(np.ones(np.shape(x)), x.dtype), self.C[0]
            )
            yours = float(_f64(self.core(point, ones)[2][p][n]).flat[e])
            with _x64():
                ones64 = jax.tree_util.tree_map(lambda x: _put(_f64(x)), ones)
            theirs = float(_f64(self._ref(point64, ones64)[1][p][n]).flat[e])
            sides, _ = self._one_sided(point64, i, t, h, [[np.ones(y.shape) for y in base]], base)
            forward, backward, _ = sides[0]
        except Exception:  # noqa: BLE001 - no all-ones values: the cotangent's are shown
            yours = theirs = math.nan
        if not (math.isfinite(yours) and math.isfinite(theirs)) or abs(yours - theirs) <= (
            tol.atol + tol.rtol * abs(theirs)
        ):
            j = next(j for (j, m, f) in interval if (m, f) == (n, e))
            yours, theirs = float(G[j][n].flat[e]), float(W[j][n].flat[e])
            forward, backward = interval[j, n, e]
            values = f"yours {yours:.4g}, reference {theirs:.4g} for cotangent v{j + 1}"
        else:
            values = f"yours {yours:.4g}, reference {theirs:.4g}"
        lo, hi = sorted((forward, backward))
        many = (
            f", at {len(err)} entries such as {at}"
            if len(err) > 1
            else f", at {at}"
            if leaf.ndim
            else ""
        )
        text = (
            f"differs from the reference's convention at the kink "
            f"{name}={float(leaf.flat[e]):.4g} ({values}; one-sided derivatives "
            f"{lo:.4g} and {hi:.4g}){many}"
        )
        if self.kink_policy != "any_subgradient":
            hint = (
                "a value between the one-sided derivatives is a subgradient: "
                "kinks='any_subgradient' accepts it"
            )
            return dataclasses.replace(
                row, diagnosis=text, note="; ".join(x for x in (row.note, hint) if x)
            )
        # Compared with the interval: the error at a kink is the distance from it.
        projected = [[x.copy() for x in ws] for ws in W]
        for (j, m, f), (lo_j, hi_j) in interval.items():
            projected[j][m].flat[f] = min(max(G[j][m].flat[f], lo_j), hi_j)
        note = "; ".join(x for x in (row.note, f"accepted (kinks='any_subgradient'): {text}") if x)
        new = _row(
            row.argument,
            row.transform,
            row.oracle,
            [
                (label, g, w)
                for (label, g, _), w in zip(triples, [w for ws in projected for w in ws])
            ],
            tol,
            note,
            row.probe,
        )
        return new if new.passed else row


def _coupled(moves: dict[Entry, np.ndarray]) -> list[list[Entry]]:
    """The entries at kinks grouped by the outputs they move (overlapping sets joined)."""
    keys = list(moves)
    parent = list(range(len(keys)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a in range(len(keys)):
        for b in range(a):
            if np.any(moves[keys[a]] & moves[keys[b]]):
                parent[root(a)] = root(b)
    groups: dict[int, list[Entry]] = {}
    for a, key in enumerate(keys):
        groups.setdefault(root(a), []).append(key)
    return list(groups.values())
