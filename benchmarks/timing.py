"""Fair timing of compiled JAX functions, shared by the benchmark scripts.

Every figure is a ratio of two functions timed in the same process: both are
compiled and warmed up first, then their calls are interleaved (A, B, A, B,
...) so that a slow spell of the machine hits both alike, each call is waited
for with ``jax.block_until_ready``, and the median of the repeats is kept.

:func:`paired_ratios` goes one step further for the headline ratios: each
round times the candidate right next to the baseline (in alternating order)
and keeps their ratio, and the figure is the median of those per-round ratios.
A slow spell of a shared machine then cancels within the round instead of
shifting one median more than the other. Timing the baseline against a second
compiled copy of itself (the A/A control) shows how far from 1.00 a ratio can
land by noise alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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


class Paired(NamedTuple):
    """What :func:`paired_ratios` measured."""

    ratios: dict[str, float]  # name -> median of time(candidate) / time(baseline) per round
    seconds: dict[str, float]  # name (and "baseline") -> median seconds per call


def paired_ratios(
    candidates: dict[str, tuple[Callable[..., Any], Sequence[Any]]],
    baseline: tuple[Callable[..., Any], Sequence[Any]],
    *,
    rounds: int = 101,
    warmup: int = 3,
) -> Paired:
    """Median over rounds of time(candidate) / time(baseline), timed side by side.

    Args:
      candidates: name -> (compiled function, positional arguments).
      baseline: (compiled function, positional arguments) every candidate is
        divided by; its calls are interleaved with each candidate's, the
        candidate first in even rounds and second in odd ones.
      rounds: timed rounds per candidate.
      warmup: untimed calls of each function first.

    Returns:
      The per-candidate medians of the per-round ratios, and the median
      seconds per call of every candidate and of the baseline.
    """
    base_fn, base_args = baseline
    for fn, args in [*candidates.values(), baseline]:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    seconds: dict[str, list[float]] = {name: [] for name in [*candidates, "baseline"]}
    for r in range(rounds):
        for name, (fn, args) in candidates.items():
            if r % 2:
                t_base = _once(base_fn, base_args)
                t = _once(fn, args)
            else:
                t = _once(fn, args)
                t_base = _once(base_fn, base_args)
            ratios[name].append(t / t_base)
            seconds[name].append(t)
            seconds["baseline"].append(t_base)
    return Paired(
        {name: statistics.median(v) for name, v in ratios.items()},
        {name: statistics.median(v) for name, v in seconds.items()},
    )


def back_to_back(step: Callable[..., Any], k: int, carry: int = 2) -> Callable[..., Any]:
    """``k`` calls of ``step`` in a row, each fed the previous call's first ``carry`` outputs.

    A training step ``step(params, state, x, y) -> (params, state, loss)`` run
    this way is ``k`` steps of training dispatched without waiting: timed with
    :func:`compare` or :func:`paired_ratios`, only the last call's output is
    waited for (``jax.block_until_ready``), so on an accelerator the launch
    and dispatch overhead of one call overlaps the previous call's work, as in
    a training loop. Divide the measured seconds by ``k`` for one step.

    Args:
      step: the function; its first ``carry`` outputs are its next first
        ``carry`` arguments, the remaining arguments (the batch) stay fixed.
      k: calls per timing, at least 1.
      carry: how many leading outputs feed the next call.

    Returns:
      ``run(*args)``, which returns the last call's output.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"back_to_back: k must be an int >= 1 (calls per timing), got {k!r}")

    def run(*args: Any) -> Any:
        out = step(*args)
        for _ in range(k - 1):
            out = step(*out[:carry], *args[carry:])
        return out

    return run


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
    return compiled_costs(jax.jit(fn).lower(*args).compile())[1]


def compiled_costs(compiled: Any) -> tuple[float | None, int | None]:
    """XLA's flop count and temporary memory (bytes) of a compiled program, where reported."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else None
    flops = (float(analysis.get("flops", 0.0)) or None) if analysis else None
    memory = compiled.memory_analysis()
    return flops, None if memory is None else int(memory.temp_size_in_bytes)
