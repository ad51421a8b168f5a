"""The rules of fnbp: one module per family, one record per rule.

Each rule is declared once, beside its code, with :func:`declare` (see
``fnbp/rules/_rule.py``); :func:`registry` holds the records. The public
functions (``fnbp.relu``) are re-exported at the top of the package; the
forward passes, backward functions and forward functions of every rule are
here, derived from the registry: ``fnbp.rules.relu_fwd``,
``fnbp.rules.relu_bwd``, ``fnbp.rules.relu_jvp``, ...

Families, in the order of the notes: linear (MM), activations, losses,
normalization, conv, pooling.
"""

from fnbp.rules import activations, conv, linear, losses, normalization, pooling  # noqa: E402,F401
from fnbp.rules._rule import Example, LayerSpec, Rule, declare, registry

for _rule in registry().values():
    globals()[_rule.fwd.__name__] = _rule.fwd
    globals()[_rule.bwd.__name__] = _rule.bwd
    if _rule.jvp is not None:
        globals()[_rule.jvp.__name__] = _rule.jvp

__all__ = ["Example", "LayerSpec", "Rule", "declare", "registry"] + [
    fn.__name__
    for _rule in registry().values()
    for fn in (_rule.fwd, _rule.bwd, _rule.jvp)
    if fn is not None
]
del _rule
