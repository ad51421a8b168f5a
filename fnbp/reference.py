"""Plain jnp implementations of every rule, with no custom derivative.

A view of the registry: ``fnbp.reference.relu`` is the ``reference`` of the
record of :func:`fnbp.relu`, written beside the rule in ``fnbp/rules/``.
These are what autodiff differentiates to give an *oracle*: ``jax.vjp`` of a
reference is compared with fnbp's hand-written rule by ``fnbp check``. They
are never used to compute fnbp's own gradients. The test suite does not use
them as its oracles: it writes its own references, so a bug in one cannot
hide a bug in a rule. Kink conventions match the rules (relu'(0) = 0,
leaky_relu'(0) = gamma).
"""

from __future__ import annotations

from fnbp.rules import registry

globals().update({name: rule.reference for name, rule in registry().items()})
__all__ = list(registry())
