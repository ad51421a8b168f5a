"""The verifier's report: tolerances, one row per check, the table, and how rows are measured."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, SupportsIndex

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """A row passes when ``max abs err <= atol + rtol * max |want|``.

    Both must be positive finite numbers (:func:`fnbp.check_vjp` refuses
    others).
    """

    rtol: float
    atol: float


DEFAULT_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "float64": Tolerance(rtol=1e-10, atol=1e-12),
        "float32": Tolerance(rtol=1e-4, atol=1e-6),
        "float16": Tolerance(rtol=1e-2, atol=1e-3),
        "bfloat16": Tolerance(rtol=5e-2, atol=1e-2),
    }
)
"""The default :class:`Tolerance` of a check by working dtype (``check_vjp``'s ``rtol``/``atol``
override them). Below float64 a comparison also allows the reference's own round-off in that
dtype (see :mod:`fnbp.verify.round_off`)."""


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
      passed: whether the row passed: ``err_over_tol <= 1``.
      note: what else the reader should know (kinks, an exception).
      probe: the point B was checked at: ``""`` for the caller's arguments,
        else the probe derived from them (``zeros``, ``signs``, ``large x1e+02``,
        ``offset +4.5e+04``, ``ties``, ``kink z=0.5``) or the factory draw
        (``key 2``, ``sizes (4, 5, 6)``); see :mod:`fnbp.verify.probes`.
      diagnosis: the likely bug when the evidence says so ("off by a
        constant factor 2", "not linear in v", "NaN at index [3]", ...), else
        ``""``.
      err_over_tol: the error as a fraction of its tolerance, the number
        the pass/fail decision compares with 1: max |got - want| /
        (atol + rtol max |want|) for a comparison, the largest
        |<J t, c> - <t, B(c)>| / (atol + rtol scale + round-off) over the
        directions for finite differences (0 where nothing was left to
        compare), infinite for a row that raised or holds a NaN. Left out,
        it is worked out from the other numbers (scale = max_abs_err /
        max_rel_err).
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
    probe: str = ""
    diagnosis: str = ""
    err_over_tol: float = math.nan

    def __post_init__(self) -> None:
        # Plain Python numbers (not numpy scalars), so that to_dict() is JSON-able.
        for name in ("max_abs_err", "max_rel_err", "rtol", "atol", "err_over_tol"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "passed", bool(self.passed))
        if math.isnan(self.err_over_tol):
            object.__setattr__(self, "err_over_tol", self._derived_ratio())

    def _derived_ratio(self) -> float:
        """err/tol of a row built without it, from its errors and tolerances."""
        err, rel = self.max_abs_err, self.max_rel_err
        if math.isnan(err) or not self.compared:
            return 0.0 if self.passed else math.inf
        scale = err / rel if rel > 0 and math.isfinite(rel) else 0.0
        return _over(err, self.atol + self.rtol * scale)

    def describe(self) -> str:
        """One line naming the argument, transform and oracle, and the numbers."""
        where = f" at {self.worst_index}" if self.worst_index else ""
        probe = f" at probe {self.probe!r}" if self.probe else ""
        why = f"; likely bug: {self.diagnosis}" if self.diagnosis else ""
        note = f"; {self.note}" if self.note else ""
        return (
            f"argument {self.argument!r}, transform {self.transform!r}, oracle "
            f"{self.oracle!r}{probe}: max rel err {_num(self.max_rel_err)} (max abs err "
            f"{_num(self.max_abs_err)}{where}), rtol {_num(self.rtol)}, atol "
            f"{_num(self.atol)}{why}{note}"
        )

    @property
    def compared(self) -> bool:
        """False for a row where nothing could be compared (an exception)."""
        return not (math.isnan(self.max_abs_err) and not self.worst_index)

    @property
    def ratio(self) -> float:
        """The error over its tolerance (:attr:`err_over_tol`): the row passes iff <= 1."""
        return self.err_over_tol


def _over(err: float, bound: float) -> float:
    """err / bound, the pass/fail number: 0 for no error, inf for an error over a zero bound."""
    if math.isnan(err):
        return math.inf
    if err == 0:
        return 0.0
    return err / bound if bound > 0 else math.inf


def _num(x: float) -> str:
    return "NaN" if math.isnan(x) else f"{x:.2e}"


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
      notes: remarks about the whole check (no custom_vjp in f, kinks,
        float64 arguments checked with x64 turned on for the check).
      custom_vjp: whether f has a ``jax.custom_vjp`` rule at all (False: its
        derivative comes from autodiff, so the check says little).
    """

    function: str
    dtype: str
    backend: str
    rows: tuple[VJPCheck, ...]
    notes: tuple[str, ...] = ()
    custom_vjp: bool = True

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
        return (
            f"check_vjp({self.function}) dtype={self.dtype} backend={self.backend}: "
            f"{passed}/{len(self.rows)} checks pass"
        )

    @property
    def diagnosis(self) -> str:
        """The likely bug, from the worst failing row that names one ("" if none)."""
        named = [row for row in self.failures if row.diagnosis]
        if not named:
            return ""
        return max(
            named, key=lambda row: (row.oracle in ("runs", "linearity", "zero v"), row.ratio)
        ).diagnosis

    @property
    def worst_ratio(self) -> float:
        """The largest err/tol of any row (:attr:`VJPCheck.ratio`): <= 1 iff the report passes.

        Infinite for a row that raised or holds a NaN.
        """
        return max((row.ratio for row in self.rows), default=0.0)

    def table(self, rows: Sequence[VJPCheck] | None = None) -> str:
        """The rows (all by default) as an aligned text table."""
        rows = self.rows if rows is None else rows
        head = (
            "argument",
            "transform",
            "oracle",
            "probe",
            "max abs err",
            "max rel err",
            "worst index",
            "rtol",
            "err/tol",
            "result",
            "note",
        )

        def cell(r: VJPCheck, x: float) -> str:
            return _num(x) if r.compared else "-"

        body = [
            (
                r.argument,
                r.transform,
                r.oracle,
                r.probe or "args",
                cell(r, r.max_abs_err),
                cell(r, r.max_rel_err),
                r.worst_index,
                _num(r.rtol),
                f"{r.ratio:.2g}",
                "PASS" if r.passed else "FAIL",
                "; ".join(x for x in (r.diagnosis and f"likely bug: {r.diagnosis}", r.note) if x),
            )
            for r in rows
        ]
        widths = [max(len(str(line[c])) for line in [head, *body]) for c in range(len(head))]
        lines = [
            "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip()
            for line in [head, *body]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        diagnosis = [f"likely bug: {self.diagnosis}"] if self.diagnosis else []
        return "\n".join(
            [self._header(), *diagnosis, self.table(), *(f"note: {n}" for n in self.notes)]
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python data, ready for ``json.dumps``.

        Non-finite numbers become the strings ``"inf"`` and ``"nan"``.
        """
        rows = []
        for row in self.rows:
            data = asdict(row)
            for key in ("max_abs_err", "max_rel_err", "rtol", "atol", "err_over_tol"):
                data[key] = _json_float(data[key])
            rows.append(data)
        return {
            "function": self.function,
            "dtype": self.dtype,
            "backend": self.backend,
            "passed": self.ok,
            "custom_vjp": self.custom_vjp,
            "diagnosis": self.diagnosis,
            "notes": list(self.notes),
            "rows": rows,
        }

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` listing every failing row; return if all pass."""
        failures = self.failures
        if failures:
            lines = [f"{self._header()}; failing:"]
            if self.diagnosis:
                lines.append(f"  likely bug: {self.diagnosis}")
            lines += [f"  {row.describe()}" for row in failures]
            raise AssertionError("\n".join(lines))


# --- comparisons ------------------------------------------------------------------


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _index(idx: Sequence[SupportsIndex]) -> str:
    return f"[{', '.join(str(int(i)) for i in idx)}]" if idx else "()"


def _measure(
    triples: Sequence[tuple[str, Any, Any]], skip_nan_want: bool = False
) -> tuple[float, float, str, float, int]:
    """max |got - want|, max |want| and where, over (label, got, want) leaves.

    Returns (max abs err, max rel err, worst index, scale, entries left out).
    NaN in both at the same place counts as equal; a NaN in ``got`` only (0/0
    in the rule) makes both errors NaN at its index; an infinity on one side
    only is an infinite error. With ``skip_nan_want`` (a reference oracle), an
    entry where only ``want`` is NaN is left out: the reference has no
    derivative there to judge by.
    """
    worst, where, scale, nan_at, skipped = -1.0, "", 0.0, "", 0
    for label, got, want in triples:
        got, want = _f64(got), _f64(want)
        if got.shape != want.shape:
            return math.inf, math.inf, f"{label} shape {got.shape} vs {want.shape}", 0.0, 0
        nan = np.isnan(got) & ~np.isnan(want)
        blind = np.isnan(want) & ~np.isnan(got) if skip_nan_want else np.zeros(got.shape, bool)
        skipped += int(blind.sum())
        if nan.any() and not nan_at:
            nan_at = label.format(idx=_index(np.unravel_index(int(np.argmax(nan)), nan.shape)))
        with np.errstate(invalid="ignore"):
            diff = np.abs(got - want)
        same = (np.isnan(got) & np.isnan(want)) | (got == want)
        diff = np.where(same | nan | blind, 0.0, np.where(np.isfinite(diff), diff, np.inf))
        finite = np.abs(want[np.isfinite(want)])
        scale = max(scale, float(finite.max(initial=0.0)))
        if diff.size and float(diff.max()) > worst:
            idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
            worst, where = float(diff[idx]), label.format(idx=_index(idx))
    if nan_at:
        return math.nan, math.nan, nan_at, scale, skipped
    worst = max(worst, 0.0)
    rel = worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)
    return worst, rel, where, scale, skipped


def _row(
    argument: str,
    transform: str,
    oracle: str,
    triples,
    tol: Tolerance,
    note: str = "",
    probe: str = "",
    diagnosis: str = "",
) -> VJPCheck:
    abs_err, rel_err, where, scale, skipped = _measure(triples, oracle == "reference")
    ratio = _over(abs_err, tol.atol + tol.rtol * scale)
    passed = ratio <= 1
    if skipped:
        blind = (
            f"the reference's derivative is NaN at {skipped} entr"
            f"{'y' if skipped == 1 else 'ies'} (no derivative there), left out"
        )
        note = f"{note}; {blind}" if note else blind
    if math.isnan(abs_err):
        diagnosis = f"NaN at index {where}"
    elif passed:
        diagnosis = ""
    return VJPCheck(
        argument,
        transform,
        oracle,
        abs_err,
        rel_err,
        where,
        tol.rtol,
        tol.atol,
        passed,
        note,
        probe,
        diagnosis,
        ratio,
    )
