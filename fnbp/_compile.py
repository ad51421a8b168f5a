"""Compile options that only buy speed, used where the installed XLA knows them.

XLA's ``xla_*`` options are not a stable interface: an option that exists in
one jaxlib is renamed or removed in the next, and an unknown option makes the
compile fail (``No such compile option``). fnbp uses a few of them only to
compile its verifier's many tiny programs faster on a CPU, never for what a
program computes. So every option is probed once per backend, on a trivial
program, and kept only if that compile succeeds; an option the installed
jaxlib does not know is dropped and everything still runs, with XLA's
defaults.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

FAST_CPU_COMPILE: Mapping[str, Any] = MappingProxyType(
    {
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    }
)
"""XLA options for small, short-lived programs on CPU (speed only).

The verifier's programs are small and each runs a few times, so compiling is
nearly all their cost: without LLVM's expensive passes and with XLA's classic
elemental emitters it is cheaper on a 2-core CPU. Results agree with the
default build to a few ulps (transcendental functions), far below every
tolerance; ``tests/test_verify.py`` checks a vmap(grad) of a conv/max-pool
network against eager execution. Options the installed jaxlib does not know
are skipped (:func:`supported_options`). Other backends compile with their
defaults.

``xla_backend_optimization_level=0`` is deliberately not here: on XLA:CPU
(jaxlib 0.10 and 0.12) it miscompiles ``jax.vmap(jax.grad(...))`` of a small
1-D conv/max-pool network (relative errors near 0.5 in the first layer's
gradients), and a verifier must not trade correctness for compile time.
"""


def _compiles_with(backend: str, name: str, value: Any) -> bool:
    """Whether a trivial program compiles on ``backend`` with ``{name: value}``."""
    try:
        # An argument committed to a device of ``backend`` makes jit compile for it.
        x = jax.device_put(jnp.zeros((), jnp.float32), jax.devices(backend)[0])
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(x).compile()
    except Exception:  # noqa: BLE001 - any failure means "do not use this option"
        return False
    return True


@functools.cache
def _supported(backend: str, options: tuple[tuple[str, Any], ...]) -> Mapping[str, Any]:
    return MappingProxyType(
        {name: value for name, value in options if _compiles_with(backend, name, value)}
    )


def supported_options(options: Mapping[str, Any], backend: str | None = None) -> Mapping[str, Any]:
    """The subset of ``options`` that the installed XLA accepts on ``backend``.

    Each option is tried on its own, once per backend and process, by
    compiling a one-operation program; an option whose compile fails is left
    out. The answer is cached.

    Args:
      options: XLA compile options, name to value.
      backend: a jax backend name; the default backend when ``None``.

    Returns:
      A read-only mapping, possibly empty.
    """
    backend = backend or jax.default_backend()
    return _supported(backend, tuple(sorted(options.items())))


def fast_compile_options(
    backend: str | None = None, options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Compile options for small programs on ``backend``, or ``None`` for defaults.

    On CPU: the supported part of ``options`` (default :data:`FAST_CPU_COMPILE`);
    on other backends ``None``.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return None
    kept = supported_options(FAST_CPU_COMPILE if options is None else options, backend)
    return dict(kept) or None
