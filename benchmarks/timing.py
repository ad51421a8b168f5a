"""Fair timing of compiled JAX functions, shared by the benchmark scripts.

Every figure is a ratio of two functions timed in the same process: both are
compiled and warmed up first, then their calls are interleaved (A, B, A, B,
...) so that a slow spell of the machine hits both alike, each call is waited
for with ``jax.block_until_ready``, and the median of the repeats is kept.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax


def _once(fn: Callable[..., Any], args: Sequence[Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def compare(
    candidates: dict[str, tuple[Callable[..., Any], Sequence[Any]]],
    *,
    repeats: int = 21,
    warmup: int = 3,
    inner: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each compiled candidate, measured interleaved.

    Args:
      candidates: name -> (function, positional arguments).
      repeats: timed rounds (each round calls every candidate ``inner`` times).
      warmup: untimed rounds first (compilation and caches).
      inner: calls per timing, for functions too fast to time one by one.

    Returns:
      name -> median seconds per call.
    """
    for _ in range(warmup):
        for fn, args in candidates.values():
            jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (fn, args) in candidates.items():
            samples[name].append(sum(_once(fn, args) for _ in range(inner)) / inner)
    return {name: statistics.median(times) for name, times in samples.items()}


def compile_seconds(fn: Callable[..., Any], args: Sequence[Any], repeats: int = 3) -> float:
    """Median seconds to lower and compile ``jax.jit(fn)`` for ``args`` (no cache)."""
    times = []
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def temp_bytes(fn: Callable[..., Any], args: Sequence[Any]) -> int | None:
    """Temporary memory of the compiled ``jax.jit(fn)`` in bytes, if XLA reports it."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)
