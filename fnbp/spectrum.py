"""The top eigenvalues of a symmetric linear map on parameter pytrees (Lanczos).

For the GGN or the Hessian of the loss as a matrix-vector product
(:func:`fnbp.ggn_vp`, :func:`fnbp.hvp`), the largest eigenvalue is the
sharpness of the loss (Cohen et al. 2021: under full-batch gradient descent at
step size lr it rises to 2/lr, the "edge of stability"). Lanczos builds an
orthonormal basis V of the Krylov space {v, A v, A^2 v, ...} with the
tridiagonal T = V^T A V; the eigenvalues of T (Ritz values) converge to A's
extreme eigenvalues first. Every new vector is re-orthogonalized against the
whole basis (twice), so no spurious copies appear; where the Krylov space is
exhausted (a map of low rank, as the GGN of a small batch is) the basis goes
on from a fresh random direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jax.flatten_util import ravel_pytree

from fnbp.nn import _args

__all__ = ["top_eigenvalues"]


def top_eigenvalues(
    matvec: Callable[[Any], Any],
    params: Any,
    k: int = 1,
    key: Array | None = None,
    *,
    iterations: int | None = None,
) -> tuple[Array, Any]:
    """The k largest eigenvalues of a symmetric map v -> A v and their eigenvectors.

    Args:
      matvec: ``v -> A v`` on pytrees like ``params`` (e.g.
        ``fnbp.ggn_vp(model, loss, params, x, y)``); A must be symmetric.
      params: a pytree with the shapes and dtypes of the vectors.
      k: how many eigenvalues, >= 1.
      key: the PRNG key of the random start vector (default ``jax.random.key(0)``).
      iterations: Lanczos steps m (default ``min(P, max(2 k + 20, 40))``, P the
        number of entries); more for more accuracy. Each step is one matvec.

    Returns:
      ``(eigenvalues, eigenvectors)``: the k largest (algebraic) Ritz values in
      decreasing order, shape (k,), and their unit Ritz vectors as a pytree
      like ``params`` with a leading axis of k. For a positive semi-definite A
      (the GGN) they are the largest in magnitude too.

    Raises:
      ValueError: k < 1, or more than the number of entries, or
        iterations < k.
    """
    fn = "top_eigenvalues"
    flat, unravel = ravel_pytree(params)
    size = flat.size
    k = _args.positive_int(fn, "k", k, "the number of eigenvalues")
    if k > size:
        raise ValueError(f"{fn}: k must be at most the number of entries, {size}; got {k}")
    m = min(size, max(2 * k + 20, 40)) if iterations is None else iterations
    m = _args.positive_int(fn, "iterations", m, "Lanczos steps")
    if m < k or m > size:
        raise ValueError(
            f"{fn}: iterations must be between k = {k} and the number of entries {size}, got {m}"
        )
    key = jax.random.key(0) if key is None else _args.prng_key(fn, key)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)

    def apply(v: Array) -> Array:
        return ravel_pytree(matvec(unravel(v.astype(flat.dtype))))[0].astype(dtype)

    start = jax.random.normal(key, (size,), dtype)
    basis = jnp.zeros((m + 1, size), dtype).at[0].set(start / jnp.linalg.norm(start))
    rows = jnp.arange(m + 1)

    tiny = 1e3 * jnp.finfo(dtype).eps

    def orthogonal(w: Array, inside: Array) -> Array:
        for _ in range(2):  # full re-orthogonalization, twice
            w = w - inside.T @ (inside @ w)
        return w

    def step(j, state):
        basis, alpha, beta, scale = state
        w = apply(basis[j])
        a = jnp.vdot(basis[j], w)
        inside = (rows <= j)[:, None] * basis  # the basis so far
        w = orthogonal(w, inside)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(a), b))
        # An invariant subspace is found (A of low rank, the GGN's N (C - 1) say): w is
        # round-off. Go on from a fresh random direction orthogonal to the basis, and
        # decouple T there (its beta is 0), as in exact arithmetic.
        broke = b <= tiny * scale

        def fresh(_):  # drawn and projected only where the space is exhausted
            draw = jax.random.normal(jax.random.fold_in(key, j + 1), (size,), dtype)
            return orthogonal(draw, inside)

        w = jax.lax.cond(broke, fresh, lambda _: w, None)
        basis = basis.at[j + 1].set(w / jnp.linalg.norm(w))
        return basis, alpha.at[j].set(a), beta.at[j].set(jnp.where(broke, 0, b)), scale

    zeros = jnp.zeros((m,), dtype)
    basis, alpha, beta, _ = jax.lax.fori_loop(
        0, m, step, (basis, zeros, zeros, jnp.zeros((), dtype))
    )
    T = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    values, vectors = jnp.linalg.eigh(T)
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    ritz = (basis[:m].T @ vectors).T  # (k, P)
    ritz = ritz / jnp.linalg.norm(ritz, axis=1, keepdims=True)
    return values, jax.vmap(unravel)(ritz.astype(flat.dtype))
