"""fnbp check: every built-in rule against jax.vjp of its plain reference.

Prints one row per rule and dtype with the max relative error and PASS/FAIL;
exits 1 on any failure.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")


def _max_relative_error(got, want) -> float:
    import jax
    import numpy as np

    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        scale = max(float(np.max(np.abs(b), initial=0.0)), np.finfo(np.float64).tiny)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / scale)
    return worst


def _cotangents(case, rule_args: tuple, v):
    """The rule's cotangents (through fnbp.backward) and the reference's (jax.vjp).

    One compiled program per rule and dtype: run eagerly, every operation of
    the rule and the reference would be compiled on its own, hundreds of small
    compilations that would dominate the run time.
    """
    import jax

    import fnbp

    def both(rule_args, v):
        rule = lambda *a: case.rule(*a, **case.kwargs)
        ref = lambda *a: case.reference(*a, **case.kwargs)
        got = fnbp.backward(rule, *rule_args)(v)
        want = jax.vjp(ref, *rule_args)[1](v)
        pairs = [(g, w) for g, w in zip(got, want) if g is not None]
        return [g for g, _ in pairs], [w for _, w in pairs]

    return jax.jit(both)(rule_args, v)


def run(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from fnbp.catalog import CASES

    tolerance = {"float64": 1e-10, "float32": 1e-4}
    print(f"fnbp check on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(f"{'rule':<24} {'dtype':<8} {'max rel err':>12}  {'tol':>8}  result")
    failed = 0
    for case in CASES:
        for dtype_name, tol in tolerance.items():
            key = jax.random.PRNGKey(args.seed)
            rule_args = case.make_args(key, jnp.dtype(dtype_name))
            out = jax.eval_shape(lambda *a, c=case: c.reference(*a, **c.kwargs), *rule_args)
            v = jax.random.normal(jax.random.fold_in(key, 1), out.shape).astype(out.dtype)
            error = _max_relative_error(*_cotangents(case, rule_args, v))
            ok = error <= tol
            failed += not ok
            print(f"{case.name:<24} {dtype_name:<8} {error:>12.2e}  {tol:>8.0e}  "
                  f"{'PASS' if ok else 'FAIL'}")
    print("all rules PASS" if not failed else f"{failed} FAIL")
    return 1 if failed else 0
