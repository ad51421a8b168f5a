"""fnbp check: run the verifier (fnbp.check_vjp) on every built-in rule, or on yours.

Usage::

    fnbp check                          every rule of fnbp.catalog.CASES
    fnbp check relu mm                  only those built-in rules
    fnbp check mypkg.ops:my_relu        a function of yours (see below)
    fnbp check --json                   the reports as JSON on stdout
    fnbp check --full                   every transform at every dtype

One row per rule and dtype: the number of checks that passed, the worst error
as a fraction of its tolerance (max |got - want| / (atol + rtol max |want|),
at most 1 on a PASS row), PASS or FAIL; the failing checks are listed
under the table (all checks with ``--verbose``). The exit status is 0 when
everything passed, 1 when a check failed, 2 when the command could not run
(an unknown rule, a module that does not import).

The default matrix fits in a minute on a 2-core CPU, where compiling is
nearly all the work: in float64 every compiled transform (``jit``,
``jit(vmap)``, ``jit(vmap(inputs))``, ``2nd order``); in float32, bfloat16
and float16 ``jit``, which is where the numerics change with the dtype. Each
is checked against the float64 reference and finite differences and for
the properties of a backward function. ``--full`` adds the op-by-op
transforms (``eager``, ``vmap``, ``vmap(inputs)``, each op compiled on its
own) and runs all of :data:`fnbp.verify.TRANSFORMS` at every dtype: several
minutes on the same CPU. ``--dtype`` picks dtypes.

Your own function: ``fnbp check MODULE:FUNCTION`` imports MODULE (the current
directory is searched first) and checks FUNCTION with, for each piece, the
first of: the flag, the per-function name, the module-wide name:

- example arguments: ``--args MODULE:FACTORY``, ``FUNCTION_args``,
  ``example_args``: a callable ``(key, dtype) -> tuple`` of positional
  arguments (like the catalog's ``make_args``), or ``() -> tuple`` (called
  once, at the dtypes it chooses). A ``(key, dtype)`` factory is drawn at
  three keys, and, if it takes ``sizes=(...)`` with repeated sizes, once
  more with every size distinct (see :mod:`fnbp.verify.draws`): that is how
  to get non-square coverage;
- a reference: ``--reference MODULE:FN``, ``FUNCTION_reference``,
  ``reference``; without one, finite differences are the oracle;
- static keyword settings: ``--kwargs '{"approximate": true}'`` (JSON),
  ``FUNCTION_kwargs``, ``static_kwargs``.

So one module can hold several rules, each with its own ``relu_reference``,
``relu_args``. ``--rtol``/``--atol`` override the tolerances (positive
finite numbers), ``--kinks any_subgradient`` accepts, where f has a kink, any
value between its one-sided derivatives instead of the reference's
convention (see :func:`fnbp.check_vjp`), and
``--transforms jit,2nd order`` picks transforms (for built-ins too). A
function without a ``jax.custom_vjp`` rule gets a WARNING and exit status 1
(its derivative is autodiff's, so there is no rule to check) unless
``--allow-plain``.

For example, ``my_ops.py``::

    import jax, jax.numpy as jnp

    @jax.custom_vjp
    def cube(z):
        return z ** 3
    cube.defvjp(lambda z: (z ** 3, z), lambda z, v: (3 * z ** 2 * v,))

    def reference(z):
        return z * z * z

    def example_args(key, dtype):
        return (jax.random.normal(key, (4, 3)).astype(dtype),)

and ``fnbp check my_ops:cube``. User functions are checked with the full
transform matrix, in float64 and float32 unless ``--dtype`` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

DTYPES = ("float64", "float32", "bfloat16", "float16")
USER_DTYPES = ("float64", "float32")
FLOAT64_TRANSFORMS = ("jit", "jit(vmap)", "jit(vmap(inputs))", "2nd order")
OTHER_TRANSFORMS = ("jit",)


class UsageError(Exception):
    """The command cannot run as asked (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="RULE|MODULE:FUNCTION",
        help="built-in rule names, or MODULE:FUNCTION of yours (default: every built-in rule)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        dest="dtypes",
        help="check at this dtype (repeatable; default: all four for "
        "built-ins, float64 and float32 for your function)",
    )
    parser.add_argument(
        "--full", action="store_true", help="every transform at every dtype (slower)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the reports as JSON instead of the table"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print every check of every report"
    )
    parser.add_argument(
        "--reference", metavar="MODULE:FN", help="reference for MODULE:FUNCTION targets"
    )
    parser.add_argument(
        "--args",
        metavar="MODULE:FACTORY",
        dest="factory",
        help="example-argument factory for MODULE:FUNCTION targets",
    )
    parser.add_argument(
        "--kwargs", metavar="JSON", help="static keyword settings for MODULE:FUNCTION targets"
    )
    parser.add_argument(
        "--rtol",
        type=_tolerance,
        help="relative tolerance, a positive finite number (default: per dtype)",
    )
    parser.add_argument(
        "--atol",
        type=_tolerance,
        help="absolute tolerance, a positive finite number (default: per dtype)",
    )
    parser.add_argument(
        "--kinks",
        choices=("reference", "any_subgradient"),
        default="reference",
        help="at a kink of f: 'reference' (default) takes the reference's "
        "convention; 'any_subgradient' accepts any value between the "
        "one-sided derivatives",
    )
    parser.add_argument(
        "--transforms",
        metavar="T1,T2",
        help="comma-separated transforms, e.g. 'jit,2nd order' (default: per target and dtype)",
    )
    parser.add_argument(
        "--allow-plain",
        action="store_true",
        help="accept a function without a jax.custom_vjp rule (no WARNING, exit 0 when it passes)",
    )


def _tolerance(text: str) -> float:
    """A --rtol/--atol value: a positive finite number (argparse reports the flag)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive finite number, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a positive finite number, got {text!r} (a check passes when max abs err "
            f"<= atol + rtol * max |want|; leave it out for the dtype's default)"
        )
    return value


# --- what to check ----------------------------------------------------------------


class _Target:
    """One function to check: its name, rule, reference, arguments and settings."""

    def __init__(
        self,
        name: str,
        rule: Callable[..., Any],
        reference: Callable[..., Any] | None,
        make_args: Callable[..., Any],
        kwargs: dict,
        builtin: bool,
    ):
        self.name, self.rule, self.reference = name, rule, reference
        self.make_args, self.kwargs, self.builtin = make_args, kwargs, builtin
        self.takes_key = builtin or _positional_count(make_args) >= 2


def _positional_count(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in kinds for p in params)


def _load(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"fnbp check: {what} must be MODULE:NAME, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SystemExit as err:
        raise UsageError(
            f"fnbp check: importing {module_name!r} (for {what} {spec!r}) called "
            f"sys.exit({err.code!r}); put the module's script code under "
            f'`if __name__ == "__main__":`'
        ) from err
    except Exception as err:
        raise UsageError(
            f"fnbp check: cannot import {module_name!r} for {what} {spec!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(
                f"fnbp check: {module_name!r} has no attribute {attr!r} (for {what} {spec!r})"
            )
        obj = getattr(obj, part)
    return obj


def _user_target(spec: str, args: argparse.Namespace) -> _Target:
    rule = _load(spec, "the function")
    module = importlib.import_module(spec.partition(":")[0])
    if not callable(rule):
        raise UsageError(f"fnbp check: {spec} is a {type(rule).__name__}, not a function")
    base = spec.partition(":")[2].rpartition(".")[2]

    def pick(suffix: str, module_wide: str, default: Any = None) -> Any:
        return getattr(module, f"{base}_{suffix}", getattr(module, module_wide, default))

    if args.factory:
        factory = _load(args.factory, "--args")
    elif pick("args", "example_args") is not None:
        factory = pick("args", "example_args")
    else:
        raise UsageError(
            f"fnbp check: no example arguments for {spec}: define {base}_args(key, dtype) "
            f"or example_args(key, dtype) -> tuple in {module.__name__}, or pass "
            f"--args MODULE:FACTORY"
        )
    if not callable(factory):
        raise UsageError(f"fnbp check: the example-argument factory of {spec} is not callable")
    reference = (
        _load(args.reference, "--reference") if args.reference else pick("reference", "reference")
    )
    if reference is not None and not callable(reference):
        raise UsageError(f"fnbp check: the reference of {spec} is not callable")
    if args.kwargs:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as err:
            raise UsageError(f"fnbp check: --kwargs is not JSON: {err}") from err
    else:
        kwargs = pick("kwargs", "static_kwargs", {})
    if not isinstance(kwargs, dict):
        raise UsageError(
            "fnbp check: static keyword settings must be a dict "
            f"(a JSON object), got {type(kwargs).__name__}"
        )
    return _Target(spec, rule, reference, factory, dict(kwargs), builtin=False)


def _targets(args: argparse.Namespace) -> list[_Target]:
    from fnbp.catalog import CASES

    builtins = [
        _Target(c.name, c.rule, c.reference, c.make_args, dict(c.kwargs), True) for c in CASES
    ]
    if not args.targets:
        return builtins
    by_name = {t.name: t for t in builtins}
    chosen = []
    for spec in args.targets:
        if ":" in spec:
            chosen.append(_user_target(spec, args))
        elif spec in by_name:
            chosen.append(by_name[spec])
        else:
            raise UsageError(
                f"fnbp check: unknown rule {spec!r}; built-in rules: "
                f"{', '.join(by_name)}; for your own function pass "
                f"MODULE:FUNCTION"
            )
    return chosen


def _transforms(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The --transforms list, checked against :data:`fnbp.verify.TRANSFORMS`."""
    from fnbp.verify import TRANSFORMS

    if not args.transforms:
        return None
    chosen = tuple(t.strip() for t in args.transforms.split(",") if t.strip())
    unknown = [t for t in chosen if t not in TRANSFORMS]
    if unknown or not chosen:
        raise UsageError(
            f"fnbp check: unknown transform(s) {unknown or [args.transforms]} in "
            f"--transforms; choose from {', '.join(TRANSFORMS)}"
        )
    return chosen


def _plan(target: _Target, args: argparse.Namespace) -> list[tuple[str | None, tuple, tuple]]:
    """(dtype, transforms, probes) for a target; dtype None: the factory decides.

    The built-in matrix probes every kind in float64 and float32; in
    bfloat16 and float16 it probes zeros, kinks, signs and ties (the probes
    at large magnitudes and offset means compile the reference once more at
    each dtype, which would double the time of the low-precision rows).
    """
    from fnbp.verify import TRANSFORMS
    from fnbp.verify.probes import PROBES

    chosen = _transforms(args)
    if not target.takes_key:
        return [(None, chosen or TRANSFORMS, PROBES)]
    dtypes = args.dtypes or (DTYPES if target.builtin else USER_DTYPES)
    if args.full or not target.builtin:
        return [(d, chosen or TRANSFORMS, PROBES) for d in dtypes]
    cheap = tuple(p for p in PROBES if p not in ("large", "offset"))
    return [
        (
            d,
            chosen or (FLOAT64_TRANSFORMS if d == "float64" else OTHER_TRANSFORMS),
            PROBES if d in ("float64", "float32") else cheap,
        )
        for d in dtypes
    ]


# --- output -----------------------------------------------------------------------


def _ratio(report) -> float:
    """The "worst err/tol" column: the largest error of a report over its tolerance.

    Per row, the number its pass/fail decision compares with 1
    (max |got - want| / (atol + rtol max |want|); see
    :attr:`fnbp.verify.VJPCheck.err_over_tol`), so a PASS row shows at most
    1 and a FAIL more. A row that raised, or whose error is NaN, counts as
    infinite.
    """
    return report.worst_ratio


def _print_table(results: list[dict], verbose: bool) -> None:
    head = ("rule", "dtype", "checks", "worst err/tol", "seconds", "result")
    lines = []
    for r in results:
        report = r["report"]
        if report is None:
            lines.append((r["rule"], r["dtype"] or "-", "-", "-", f"{r['seconds']:.1f}", "FAIL"))
            continue
        passed = sum(row.passed for row in report.rows)
        lines.append(
            (
                r["rule"],
                report.dtype,
                f"{passed}/{len(report.rows)}",
                f"{_ratio(report):.2g}",
                f"{r['seconds']:.1f}",
                "PASS" if report.ok and not r["plain"] else "FAIL" if not report.ok else "WARNING",
            )
        )
    widths = [max(len(str(x[c])) for x in [head, *lines]) for c in range(len(head))]
    for line in [head, *lines]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())
    for r in results:
        report = r["report"]
        if report is None:
            print(f"\n{r['rule']} ({r['dtype']}): {r['error']}")
        elif verbose:
            print(f"\n{report}")
        elif not report.ok:
            print(f"\n{r['rule']} ({report.dtype}) failing checks:")
            if report.diagnosis:
                print(f"likely bug: {report.diagnosis}")
            print(report.table(report.failures))


def run(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from fnbp.verify import check_vjp
    from fnbp.verify.draws import _as_tuple, example_args

    try:
        targets = _targets(args)
        plans = [(target, _plan(target, args)) for target in targets]
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    device = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    started = time.perf_counter()
    results = []
    drawn: dict = {}
    for target, plan in plans:
        for dtype, transforms, probes in plan:
            t0 = time.perf_counter()
            result: dict[str, Any] = {
                "rule": target.name,
                "dtype": dtype,
                "transforms": list(transforms),
            }
            settings = dict(
                reference=target.reference,
                static_kwargs=target.kwargs,
                transforms=transforms,
                seed=args.seed,
                rtol=args.rtol,
                atol=args.atol,
                probes=probes,
                kinks=args.kinks,
            )
            try:
                if dtype is None:
                    report = check_vjp(target.rule, *_as_tuple(target.make_args()), **settings)
                elif target.builtin:
                    report = check_vjp(
                        target.rule,
                        *example_args(target.make_args, dtype, args.seed, drawn),
                        **settings,
                    )
                else:  # drawn at several keys, and at distinct sizes where it can be
                    report = check_vjp(target.rule, args=target.make_args, dtype=dtype, **settings)
                result["report"] = report
            except Exception as err:  # bad input to the verifier: a failed row, not a crash
                result["report"] = None
                result["error"] = f"{type(err).__name__}: {err}"
            result["plain"] = (
                result["report"] is not None
                and not result["report"].custom_vjp
                and not args.allow_plain
            )
            result["seconds"] = time.perf_counter() - t0
            results.append(result)
    failed = sum(r["report"] is None or not r["report"].ok or r["plain"] for r in results)
    plain = sorted({r["rule"] for r in results if r["plain"]})
    elapsed = time.perf_counter() - started

    if args.json:
        print(
            json.dumps(
                {
                    "device": device,
                    "passed": not failed,
                    "seconds": round(elapsed, 3),
                    "results": [
                        {
                            "rule": r["rule"],
                            "dtype": r["report"].dtype if r["report"] is not None else r["dtype"],
                            "transforms": r["transforms"],
                            "passed": r["report"] is not None and r["report"].ok and not r["plain"],
                            "seconds": round(r["seconds"], 3),
                            **(
                                {"report": r["report"].to_dict()}
                                if r["report"] is not None
                                else {"error": r["error"]}
                            ),
                        }
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    else:
        print(
            f"fnbp check on {device}: check_vjp against the float64 reference and "
            f"finite differences"
        )
        _print_table(results, args.verbose)
        for name in plain:
            print(
                f"\nWARNING: {name} has no jax.custom_vjp rule: its derivative comes from "
                f"autodiff, so there is no hand-written rule to check; define it with "
                f"jax.custom_vjp, or pass --allow-plain to accept it"
            )
        print(f"\n{len(results)} reports in {elapsed:.1f} s")
        print("all rules PASS" if not failed else f"{failed} of {len(results)} FAIL")
    return 1 if failed else 0
