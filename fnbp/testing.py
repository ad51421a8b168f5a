"""Check hand-written VJPs from your own test suite.

:func:`assert_vjp` runs :func:`fnbp.check_vjp` and raises ``AssertionError``
with a one-screen message (the likely bug, then the failing rows) when B is
wrong; pytest shows it as the test's failure::

    from fnbp.testing import assert_vjp

    def test_my_relu():
        assert_vjp(my_relu, z, reference=lambda z: jnp.where(z > 0, z, 0.0))

:func:`arrays` is a hypothesis strategy of arguments for a property-based test
(hypothesis is optional: it is imported only when the strategy is built).
Its draws include the points where rules go wrong: exact zeros, repeated
values (ties), both signs and a wide range of magnitudes::

    from hypothesis import given, settings
    from fnbp.testing import arrays, assert_vjp

    @settings(max_examples=10, deadline=None)
    @given(arrays((4, 3)))
    def test_my_relu_everywhere(z):
        assert_vjp(my_relu, z, reference=ref_relu, transforms=("jit",), probes=False)

Keep the shapes fixed in such a test: each new shape compiles new programs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fnbp.verify import check_vjp

_MAX_ROWS = 8
_MAX_LINE = 220


def assert_vjp(f: Callable[..., Any], *arrays: Any, **kwargs: Any):
    """Assert that f's hand-written VJP passes :func:`fnbp.check_vjp`; return the report.

    Args:
      f: the function with a ``jax.custom_vjp`` rule.
      *arrays: its positional arguments (or pass ``args=`` a factory).
      **kwargs: passed to :func:`fnbp.check_vjp` (``reference``,
        ``static_kwargs``, ``transforms``, ``rtol``, ``atol``, ``probes``,
        ``args``, ``kinks="any_subgradient"`` to accept any subgradient at a
        kink, ...).

    Returns:
      The :class:`fnbp.verify.VJPReport`, when every check passed.

    Raises:
      AssertionError: with at most one screen: the header, the likely bug,
        up to 8 failing rows (one line each) and how many more failed.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this one
    report = check_vjp(f, *arrays, **kwargs)
    if not report.ok:
        raise AssertionError(failure_message(report))
    if not report.custom_vjp:
        raise AssertionError(
            f"assert_vjp: {report.function} has no jax.custom_vjp rule; its "
            f"derivative comes from autodiff, so there is no rule to check"
        )
    return report


def failure_message(report) -> str:
    """The one-screen account of a failing report that :func:`assert_vjp` raises."""
    failures = report.failures
    passed = len(report.rows) - len(failures)
    lines = [
        f"check_vjp({report.function}) failed {len(failures)} of {len(report.rows)} "
        f"checks ({passed} passed), dtype {report.dtype}"
    ]
    if report.diagnosis:
        lines.append(f"likely bug: {report.diagnosis}")
    ranked = sorted(failures, key=lambda row: -row.ratio)
    for row in ranked[:_MAX_ROWS]:
        text = row.describe()
        lines.append("  " + (text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 3] + "..."))
    if len(failures) > _MAX_ROWS:
        lines.append(
            f"  ... and {len(failures) - _MAX_ROWS} more failing rows "
            f"(print(fnbp.check_vjp(...)) shows them all)"
        )
    return "\n".join(lines)


def arrays(shape: tuple[int, ...], dtype: Any = "float64", max_magnitude: float = 1e3):
    """A hypothesis strategy of NumPy arrays that visit the points where rules break.

    Entries are drawn from a mix of exact zeros, small and large magnitudes
    of both signs (up to ``max_magnitude``) and a few repeated values, so
    kinks, ties and overflow are reached.

    Args:
      shape: the array's shape (keep it fixed in a test: shapes compile).
      dtype: a NumPy floating dtype name.
      max_magnitude: the largest |entry|.

    Returns:
      A ``hypothesis`` strategy of ``numpy.ndarray``.

    Raises:
      ImportError: hypothesis is not installed (``pip install hypothesis``).
    """
    try:
        from hypothesis import strategies as st
        from hypothesis.extra import numpy as hnp
    except ImportError as err:  # pragma: no cover - hypothesis is in the test extra
        raise ImportError("fnbp.testing.arrays needs hypothesis: pip install hypothesis") from err
    import numpy as np

    special = st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.5])
    finite = st.floats(
        -max_magnitude,
        max_magnitude,
        allow_nan=False,
        allow_infinity=False,
        width=64 if np.dtype(dtype) == np.float64 else 32,
    )
    return hnp.arrays(np.dtype(dtype), shape, elements=st.one_of(special, finite))
