"""The verifier: check a hand-written VJP against autodiff and finite differences.

A backward function B[f, z](v) = (df/dz)^T v (CS229 notes, eqs. 7.57-7.59)
must be right at every point, for every argument, under every transform a
caller will put it through. :func:`check_vjp` computes B with ``f``'s own rule
(its ``jax.custom_vjp``, through ``jax.vjp``) and compares it with
independent oracles::

    report = fnbp.check_vjp(my_relu, z, reference=lambda z: jnp.where(z > 0, z, 0.0))
    print(report)          # one row per (argument, transform, oracle)
    report.assert_ok()     # AssertionError naming argument, transform, oracle

Oracles (the ``oracle`` column):

- ``reference``: ``jax.vjp`` of ``reference``, a plain implementation of the
  same function, evaluated in float64 on the same (exactly up-cast) inputs.
  At a kink the reference's convention decides; with
  ``kinks="any_subgradient"`` any value between f's one-sided derivatives is
  accepted there instead, and a rule that differs from the reference only at
  kinks by such values is diagnosed as a convention ("differs from the
  reference's convention at the kink z=0 (yours 0, reference 1; one-sided
  derivatives -1 and 1)"; :mod:`fnbp.verify.kinks`).
- ``finite diff``: central differences of ``f`` in float64 through the
  dot-product test <J t, c> = <t, J^T c> over ``n_directions`` random
  directions t (in one argument) and cotangents c. Kinks are detected: a
  direction whose one-sided slopes disagree (f is not differentiable there)
  is left out and reported in the note, never failed; a point merely close to
  a kink is handled by shrinking the step until two steps agree.
- ``loop``: a batched transform against the same rule called one example at
  a time.
- properties of B: ``linearity`` B(a v1 + b v2) = a B(v1) + b B(v2);
  ``zero v`` B(0) = 0; ``shape/dtype`` each cotangent has its primal's shape
  and dtype (float0, i.e. none, for integer arguments); ``primal`` the
  primal output of ``jax.vjp`` (the fwd rule's) equals ``f(*args)`` (and
  the reference's, when given); ``rerun`` two runs give the same cotangents.

Transforms (the ``transform`` column), see :data:`TRANSFORMS`: ``eager``,
``jit``, ``vmap`` (a batch of cotangents), ``jit(vmap)``, ``vmap(inputs)``
(a stacked batch of inputs, member m a copy of the arguments with each
floating entry scaled by 1 + 0.05 u, u uniform in [-1, 1], member 1 the
arguments themselves, and of cotangents), ``jit(vmap(inputs))`` and
``2nd order``: the gradient of the cotangent-weighted gradient,
grad_z <B[f, z](v), u>, taken reverse-over-reverse (forward mode does not
pass through ``jax.custom_vjp``), checked against the same expression for the
reference and against finite differences of the rule's own B. The
properties are checked under ``jit`` (eagerly when ``jit`` is not asked
for). ``vmap`` hides the batch axis from the rule (``v.ndim`` and
``v.shape`` stay per-example), so what goes wrong under ``vmap`` alone is a
rule that does see the batch: a ``jax.custom_batching.custom_vmap`` batching
rule, a callback's ``vmap_method``.

Cost. Compiling is nearly all of it, so each check compiles a handful of
small programs and runs each many times; on CPU they are compiled with
:data:`FAST_COMPILE`, and programs are shared between checks of the same
function (other dtypes, other seeds). The ``eager`` and eager ``vmap``
transforms compile each operation on its own, which is slower.

Errors and tolerances. For an argument (all its floating leaves, over all
cotangents drawn) ``max abs err = max |got - want|``; ``max rel err`` is
that over ``max |want|``; a row passes when
``err/tol = max abs err / (atol + rtol * max |want|) <= 1`` (the row's
``ratio``, what ``fnbp check`` shows as "worst err/tol": at most 1 on a
PASS). The tolerance comes from the coarsest floating dtype among the inputs
and outputs (:data:`DEFAULT_TOLERANCES`; ``rtol=``/``atol=`` override it,
with positive finite numbers: others are refused):

    ========  =======  =======
    dtype     rtol     atol
    ========  =======  =======
    float64   1e-10    1e-12
    float32   1e-4     1e-6
    float16   1e-2     1e-3
    bfloat16  5e-2     1e-2
    ========  =======  =======

Below float64, the ``2nd order`` reference rows and the ``large`` and
``offset`` probes allow the reference's own round-off in the working dtype:
atol grows by 4 times the larger of what the reference's program compiled
at that dtype is off by and what Monte Carlo arithmetic on its program
predicts (:mod:`fnbp.verify.round_off`), so the allowance does not depend
on what one compiler makes of the reference.

Finite-difference rows compare scalars per direction, relative to the size of
the terms summed (so cancellation does not inflate the error), with
``rtol = max(dtype rtol, fd_rtol)`` (``fd_rtol`` grows tenfold for each
tenfold reduction of the step near a kink).

Probes. Alongside the caller's arguments, B is checked at points derived
from them, each row naming its probe: exact zeros, the reference's kinks,
flipped signs, large magnitudes, an offset mean, ties
(:mod:`fnbp.verify.probes`). A factory ``args=`` is drawn at several keys
and at distinct sizes (:mod:`fnbp.verify.draws`).

Diagnoses. A failing row names the likely bug when the evidence says so
(a constant factor, a sign flipped where z < 0, swapped cotangents, not
linear in v, a NaN and its index, a cotangent of the wrong shape, another
convention at a kink); an
exception is one row with the file:line in the caller's code
(:mod:`fnbp.verify.diagnose`). :func:`check_layer` checks a Layer's
backward, sq_norms and init (:mod:`fnbp.verify.layer`).

The package: ``report`` (rows, tables, tolerances), ``arguments`` (names,
leaves, host-side arrays), ``programs`` (the compiled programs),
``finite_diff``, ``probes``, ``draws``, ``diagnose``, ``round_off`` (the
reference's round-off below float64), ``kinks`` (kink conventions),
``checker`` (one check's matrix), ``check`` (:func:`check_vjp`), ``layer``.

Arguments. ``args`` are pytrees of arrays; each top-level positional argument
is one row group (a pytree's worst index names its leaf). Integer and boolean
leaves are not differentiated (their cotangent is float0); an argument with no
floating leaf (a label array, ``None``) gets no rows. Static settings (a
Python bool, a string, an axis) are not arrays: pass them as
``static_kwargs={"approximate": True}`` or bind them with
``functools.partial(f, approximate=True)``; they are passed to ``f`` and to
``reference`` as keyword arguments and never traced.
"""

from fnbp.verify.check import check_vjp
from fnbp.verify.finite_diff import FD_RTOL, FD_STEP
from fnbp.verify.layer import check_layer
from fnbp.verify.programs import FAST_COMPILE, TRANSFORMS, jit_fast
from fnbp.verify.report import DEFAULT_TOLERANCES, Tolerance, VJPCheck, VJPReport

__all__ = [
    "DEFAULT_TOLERANCES",
    "FAST_COMPILE",
    "FD_RTOL",
    "FD_STEP",
    "TRANSFORMS",
    "Tolerance",
    "VJPCheck",
    "VJPReport",
    "check_layer",
    "check_vjp",
    "jit_fast",
]
