"""The verifier's finite differences: float64 central differences and kink detection.

The dot-product test <J t, c> = <t, J^T c> along random directions t; a
direction whose one-sided slopes disagree crosses a kink and is left out; a
point close to a kink shrinks the step until two steps agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fnbp.verify.arguments import _Arg, _put
from fnbp.verify.programs import Cotangents, _x64
from fnbp.verify.report import Tolerance, VJPCheck, _f64, _index, _over

FD_RTOL = 1e-6
"""Relative tolerance of a float64 central difference at the default step."""

FD_STEP = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)
"""Default central-difference step, relative to max(1, max |x|): about 6e-6."""

_FD_LEVELS = 4  # steps h, h/10, h/100, h/1000
_FD_CONVERGED = 1e-6  # two steps agree: |E_k - E_k+1| <= this * scale
_KINK = 1e-3  # one-sided slopes disagree by more than this * scale: a kink
_EPS = float(np.finfo(np.float64).eps)
_NOISE = 8.0  # round-off allowance, in units of the estimated round-off R


class _FiniteDifferences:
    """The finite-difference oracle of :class:`fnbp.verify.checker._Checker` (a mixin).

    Uses the checker's ``diff``, ``infos``, ``n``, ``T`` (directions),
    ``fd_step``, ``fd_rtol``, ``tol``, ``rows`` and ``kinks``.
    """

    # The checker's, declared here for type checkers (the checker sets them).
    diff: list[int]
    infos: list[_Arg]
    n: int
    T: list[list[list[np.ndarray]]]  # T[p][j]: direction j's leaves for argument diff[p]
    fd_step: float
    fd_rtol: float
    tol: Tolerance
    rows: list[VJPCheck]
    kinks: dict[int, str]

    def fd_probe(self, F, args64: tuple, weights: Sequence[Sequence[Any]]) -> list:
        """Differences of <w_j, F_m> along t_j in each argument, in float64.

        ``F(args)`` (compiled once) returns a tuple of outputs F_m (pytrees);
        ``weights[m][j]`` weighs F_m along direction j (c_j for f, u_j for
        B[f, .](v0)). F is evaluated at x +- h_k t_j, with h_k = h 10^-k,
        k < 4, and h = fd_step * max(1, max |x|).

        Returns, per output m and per differentiable argument, numpy arrays
        (E, S, forward, backward, S1, R): E[j, k] the central difference
        <w_j, F_m(x + h_k t_j) - F_m(x - h_k t_j)> / (2 h_k); S[j, k] the same
        sum over absolute terms (the scale that cancellation hides); the
        one-sided slopes at the finest step and their scale S1[j]; R[j, k]
        the round-off of E[j, k]: eps * sum |w_j F_m(x +- h_k t_j)| / (2 h_k),
        what the differences cannot resolve (large where |F| is large).
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
            probes: list[list[tuple]] = [[] for _ in weights]
            for p, i in enumerate(self.diff):
                info = self.infos[i]
                point = jax.tree_util.tree_leaves(args64[i])
                xs = [_f64(point[k]) for k in info.floats]
                big = max(float(np.abs(x).max(initial=0.0)) for x in xs)
                h = self.fd_step * max(1.0, big) * 10.0 ** -np.arange(_FD_LEVELS)
                E = np.zeros((len(weights), self.n, _FD_LEVELS))
                S = np.zeros_like(E)
                R = np.zeros_like(E)
                one_sided = np.zeros((len(weights), 3, self.n))
                for j in range(self.n):
                    for k in range(_FD_LEVELS):
                        outs = []
                        for step in (h[k], -h[k]):
                            a = list(args64)
                            a[i] = info.with_floats(
                                [_put(x + step * t) for x, t in zip(xs, self.T[p][j])]
                            )
                            outs.append([leaves(y) for y in F(tuple(a))])
                        for m in range(len(weights)):
                            delta = [u - d for u, d in zip(outs[0][m], outs[1][m])]
                            E[m, j, k] = dot(W[m][j], delta) / (2 * h[k])
                            S[m, j, k] = size(W[m][j], delta) / (2 * h[k])
                            R[m, j, k] = (
                                _EPS
                                * (size(W[m][j], outs[0][m]) + size(W[m][j], outs[1][m]))
                                / (2 * h[k])
                            )
                    for m in range(len(weights)):  # one-sided, at the finest step
                        rise = [u - b for u, b in zip(outs[0][m], base[m])]
                        fall = [b - d for d, b in zip(outs[1][m], base[m])]
                        one_sided[m, :, j] = (
                            dot(W[m][j], rise) / h[-1],
                            dot(W[m][j], fall) / h[-1],
                            max(size(W[m][j], rise), size(W[m][j], fall)) / h[-1],
                        )
                for m in range(len(weights)):
                    probes[m].append((E[m], S[m], *one_sided[m], R[m]))
            return probes

    def fd_levels(self, probe_p) -> list[int | str]:
        """Per direction: the step level to trust, or ``"kink"`` / ``"unsettled"``.

        A direction along which the one-sided slopes at the finest step
        disagree crosses a kink (f is not differentiable there). Otherwise the
        first step whose central difference agrees with the next finer one is
        trusted: level 0 away from kinks, a finer one close to a kink. Two
        steps agree within their round-off too (R), so a smooth function far
        from the origin, whose differences carry the round-off of its large
        values, is not mistaken for one near a kink.
        """
        E, S, fw, bw, S1, R = probe_p
        levels: list[int | str] = []
        for j in range(self.n):
            if abs(fw[j] - bw[j]) > _KINK * S1[j]:
                levels.append("kink")
                continue
            level = next(
                (
                    k
                    for k in range(_FD_LEVELS - 1)
                    if abs(E[j, k] - E[j, k + 1])
                    <= _FD_CONVERGED * max(S[j, k], S[j, k + 1]) + _NOISE * (R[j, k] + R[j, k + 1])
                ),
                None,
            )
            levels.append("unsettled" if level is None else level)
        return levels

    def note_kinks(self, probe) -> None:
        """Remember the arguments at a kink, for the notes of the reference rows."""
        for p, i in enumerate(self.diff):
            kinks = self.fd_levels(probe[p]).count("kink")
            if kinks:
                self.kinks[i] = (
                    f"at a kink ({kinks}/{self.n} directions): the reference's convention decides"
                )

    def fd_rows(
        self, transform: str, probe, got: Sequence[Cotangents], probe_name: str = ""
    ) -> None:
        """The dot-product test per argument: <J t_j, c_j> vs <t_j, B(c_j)>.

        A direction passes when the two sides agree within
        ``atol + rtol * scale`` plus the differences' own round-off.
        """
        tol = self.tol
        for p, i in enumerate(self.diff):
            E, S, R = probe[p][0], probe[p][1], probe[p][5]
            nan_at = ""
            levels = self.fd_levels(probe[p])
            worst_abs, worst_rel, where, over = 0.0, 0.0, "", 0.0
            ratios = []
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
                    if abs(estimate) > 1e-3 * S[j, level] and S[j, level] > 0:
                        ratios.append(side / estimate)
                else:
                    err, scale = math.inf, S[j, level]
                    for x, path in zip(
                        leaves, (self.infos[i].paths[k] for k in self.infos[i].floats)
                    ):
                        if np.isnan(x).any() and not nan_at:
                            idx = np.unravel_index(int(np.argmax(np.isnan(x))), x.shape)
                            nan_at = f"{path}{_index(idx)} v{j + 1}"
                rtol_j = max(tol.rtol, self.fd_rtol * 10.0**level)
                rtol_used = max(rtol_used, rtol_j)
                rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
                over = max(over, _over(err, tol.atol + rtol_j * scale + _NOISE * R[j, level]))
                if rel > worst_rel or not where:
                    worst_abs, worst_rel, where = err, rel, f"dir {j + 1}"
            notes = []
            for status, text in (
                ("kink", "kink: f is not differentiable along direction(s) {} of {}, left out"),
                (
                    "unsettled",
                    "finite differences did not settle along direction(s) {} of {}, left out",
                ),
            ):
                bad = [str(j + 1) for j, level in enumerate(levels) if level == status]
                if bad:
                    notes.append(text.format(", ".join(bad), self.n))
            near = [
                str(j + 1)
                for j, level in enumerate(levels)
                if not isinstance(level, str) and level > 0
            ]
            if near:
                notes.append(f"near a kink: step reduced along direction(s) {', '.join(near)}")
            if not where:
                worst_abs = worst_rel = math.nan
            passed = over <= 1
            diagnosis = ""
            if not passed and len(ratios) >= 2:
                c = float(np.median(ratios))
                if all(abs(r - c) <= 1e-3 * abs(c) for r in ratios) and abs(c - 1) > 1e-2:
                    diagnosis = (
                        "sign flipped (factor -1)"
                        if abs(c + 1) <= 1e-3
                        else f"off by a constant factor {c:.4g}"
                    )
            if nan_at:
                worst_abs = worst_rel = math.nan
                where, diagnosis = nan_at, f"NaN at index {nan_at}"
            self.rows.append(
                VJPCheck(
                    self.infos[i].name,
                    transform,
                    "finite diff",
                    worst_abs,
                    worst_rel,
                    where,
                    rtol_used,
                    tol.atol,
                    passed,
                    "; ".join(notes),
                    probe_name,
                    diagnosis,
                    over,
                )
            )
