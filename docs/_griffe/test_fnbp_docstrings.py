"""The docs build's griffe extension reads the docstrings' reST habits as Markdown.

Needs griffe, from the dev extra (the docs build loads the same extension); the project's
checks run it: ``python -m pytest -n 0 docs/_griffe``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fnbp_docstrings import markdown  # noqa: E402


def test_docstrings_read_as_markdown_in_the_site():
    assert markdown("by :func:`fit` and :class:`~fnbp.Layer`") == "by `fit` and `fnbp.Layer`"
    assert markdown("B[relu, z](v) and x[0][1], `B[M, z](v)`, [site](https://x.org)") == (
        "B\\[relu, z](v) and x\\[0][1], `B[M, z](v)`, [site](https://x.org)"
    )
    assert markdown("Example::\n\n    B[f, z](v)\n\nafter") == "Example:\n\n    B[f, z](v)\n\nafter"
    table = "a:\n\n    ==  ==\n    x   y\n    ==  ==\n    1   2\n    ==  ==\n"
    assert "| x | y |\n| --- | --- |\n| 1 | 2 |" in markdown(table)
    assert markdown("Args:\n  z, W: the input\n    and the weight.\n  b: bias.") == (
        "Args:\n  z: the input\n    and the weight.\n  W: the input\n    and the weight.\n"
        "  b: bias."
    )
