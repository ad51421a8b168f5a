"""Every example of every declared rule, with its plain reference.

One :class:`RuleCase` per example of each record of
:func:`fnbp.rules.registry` (a rule and its named variants, such as
``"gelu(approximate)"``): what ``fnbp check`` runs and what the verifier
sweeps. Nothing here is written by hand: a rule declared in ``fnbp/rules/``
is in :data:`CASES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax

from fnbp.rules import registry


@dataclass(frozen=True)
class RuleCase:
    """A built-in rule, its plain reference and a factory of example arguments.

    Attributes:
      name: the rule's public name, or the name of one of its examples.
      rule: the fnbp function (hand-written custom_vjp rule).
      reference: a plain jnp function with the same signature.
      make_args: ``(key, dtype) -> tuple`` of positional arguments.
      kwargs: static keyword settings passed to both.
    """

    name: str
    rule: Callable[..., Any]
    reference: Callable[..., Any]
    make_args: Callable[[jax.Array, Any], tuple]
    kwargs: dict = field(default_factory=dict)


CASES: tuple[RuleCase, ...] = tuple(
    RuleCase(example_name, rule.function, rule.reference, example.make_args, dict(example.kwargs))
    for rule in registry().values()
    for example_name, example in rule.examples.items()
)
