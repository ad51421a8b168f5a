"""The verifier's report: tolerances, one row per check, the table, and how rows are measured."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

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



# --- comparisons ------------------------------------------------------------------


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
