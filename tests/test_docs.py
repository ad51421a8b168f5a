"""The documentation says what the code does: its examples run, its synopses and its API pages
are complete.

- Every ```python block of README.md and docs/*.md runs on its own: in a fresh namespace, in a
  temporary working directory (nothing is written into the repository); a block that gives
  the CPU several devices (``JAX_NUM_CPU_DEVICES``) in a fresh interpreter. Blocks in other
  languages (bash, text) are not run; a command that cannot run here (several hosts) is shown
  as one of those.
- The ``fnbp train`` and ``fnbp check`` synopses (```text blocks starting with the command)
  name every flag of the command's argument parser and no other.
- Every public name (``fnbp.__all__``, the subpackages' and fnbp.train's modules' ``__all__``,
  or for a module without one its public functions and classes) is rendered by a ``:::``
  directive of docs/api/*.md and has a docstring.
- The quick start's two commands stand verbatim in README.md and on the site's home page, and
  the places that cite the design notes (``docs/design.md#<section>``) name sections that
  exist.
The site itself (``mkdocs build --strict``) is built by the project's checks, with the dev
extra, which also run the docs build's griffe extension's own test
(docs/_griffe/test_fnbp_docstrings.py); nothing here needs mkdocs or griffe.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(
    path for path in DOCS.rglob("*.md") if "tutorials" not in path.relative_to(DOCS).parts
)
QUICK_START = (
    'python -m pip install ".[train]" && fnbp train',
    'python -m pip install ".[test]" && python -m pytest',
)

PACKAGES = [
    "fnbp",
    "fnbp.rules",
    "fnbp.nn",
    "fnbp.verify",
    "fnbp.train",
    *(
        f"fnbp.train.{name}"
        for name in (
            "loop",
            "steps",
            "data",
            "checkpoint",
            "sharding",
            "precision",
            "dp",
            "stopping",
        )
    ),
    "fnbp.testing",
]
"""The packages and modules whose public names the API reference documents."""


def _fenced(path: Path, language: str) -> list[tuple[int, str]]:
    """The ```language blocks of a Markdown file: (line number, code)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```\s*(\S*)\s*$", lines[i])
        if opening is None:
            i += 1
            continue
        indent, info, start = opening.group(1), opening.group(2), i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if info == language:
            blocks.append((start, "\n".join(line[len(indent) :] for line in lines[start:i])))
        i += 1
    return blocks


PYTHON_BLOCKS = [
    pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
    for path in PAGES
    for line, code in _fenced(path, "python")
]


def test_the_pages_have_python_blocks():
    assert len(PYTHON_BLOCKS) >= 15
    assert any(param.id.startswith("README.md:") for param in PYTHON_BLOCKS)


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_python_block_runs_on_its_own(code, tmp_path, monkeypatch):
    if "JAX_NUM_CPU_DEVICES" in code:
        # a block that sets up devices before jax starts gets an interpreter of its own, on
        # the CPU (whatever the machine's accelerators), where the variable gives the devices
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("JAX_NUM_CPU_DEVICES", None)
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return
    assert "jax.config" not in code, "a block runs in this process: leave jax's config alone"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs block>", "exec"), {"__name__": "__docs__"})


# --- the command-line synopses ----------------------------------------------------------


def _parser_flags(command: str) -> list[tuple[str, ...]]:
    """The option strings of each optional argument of ``fnbp COMMAND``, --help left out."""
    module = importlib.import_module(f"fnbp.cli.{command}")
    parser = argparse.ArgumentParser(prog=f"fnbp {command}")
    module.add_arguments(parser)
    return [
        tuple(action.option_strings)
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


def _synopses(command: str) -> list[tuple[str, set[str]]]:
    """Each synopsis of ``fnbp COMMAND`` in the pages: (where, the flags it names)."""
    found = []
    for path in PAGES:
        for line, code in _fenced(path, "text"):
            text = None
            for row in code.splitlines() + [""]:
                if text is not None and row.startswith(" "):
                    text += " " + row
                    continue
                if text is not None:
                    found.append(
                        (
                            f"{path.relative_to(ROOT)}:{line}",
                            set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text)),
                        )
                    )
                    text = None
                if re.match(rf"^fnbp {command}(\s|$)(?!\s*:)", row):
                    text = row
    return found


@pytest.mark.parametrize("command", ["train", "check"])
def test_synopsis_names_every_flag_of_the_parser(command):
    actions = _parser_flags(command)
    known = {flag for flags in actions for flag in flags}
    synopses = _synopses(command)
    assert synopses, f"no `fnbp {command}` synopsis in README.md or docs/"
    for where, flags in synopses:
        missing = [flags_ for flags_ in actions if not set(flags_) & flags]
        assert missing == [], f"{where}: the fnbp {command} synopsis lacks {missing}"
        assert sorted(flags - known) == [], f"{where}: fnbp {command} has no such flags"


# --- the API reference ------------------------------------------------------------------


def _resolve(target: str):
    """The object a ``::: target`` directive documents."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(target)


def _directives() -> list[str]:
    return [
        match.group(1)
        for path in sorted((DOCS / "api").glob("*.md"))
        for match in re.finditer(r"^::: (\S+)\s*$", path.read_text(encoding="utf-8"), re.MULTILINE)
    ]


def _public(module) -> list[str]:
    """``__all__``, or the functions and classes a module without one defines."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for name, obj in vars(module).items():
        target = getattr(obj, "__wrapped__", obj)
        if (
            not name.startswith("_")
            and (inspect.isfunction(target) or inspect.isclass(target))
            and target.__module__ == module.__name__
        ):
            names.append(name)
    return names


def _public_names() -> list[tuple[str, object]]:
    out = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        out += [(f"{package}.{name}", getattr(module, name)) for name in _public(module)]
    return out


def test_every_directive_resolves():
    unresolved = []
    for target in _directives():
        try:
            _resolve(target)
        except (ImportError, AttributeError):
            unresolved.append(target)
    assert unresolved == []


def test_every_public_name_is_in_the_api_reference():
    targets = _directives()
    objects = {}
    for target in targets:
        objects.setdefault(id(_resolve(target)), []).append(target.rsplit(".", 1)[-1])
    missing = []
    for public, obj in _public_names():
        name = public.rsplit(".", 1)[-1]
        named = objects.get(id(obj), [])
        plain = inspect.ismodule(obj) or callable(obj)
        if not named or not (plain or name in named):
            missing.append(public)
    assert missing == [], "add a `::: <defining module>.<name>` to a page of docs/api/"


def _attribute_docstring(package: str, name: str) -> str | None:
    """The string literal under ``NAME = ...`` at the top of a module of ``package``."""
    for module_name, module in sorted(sys.modules.items()):
        if not (module_name == package or module_name.startswith(package + ".")):
            continue
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        body = ast.parse(Path(path).read_text(encoding="utf-8")).body
        for statement, following in pairwise(body):
            targets = (
                statement.targets
                if isinstance(statement, ast.Assign)
                else [statement.target]
                if isinstance(statement, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                if (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                ):
                    return following.value.value
                return None
    return None


def _docstring(public: str, obj) -> str | None:
    if inspect.ismodule(obj):
        return obj.__doc__
    target = getattr(obj, "__wrapped__", obj)
    if inspect.isclass(target) or inspect.isfunction(target) or inspect.isbuiltin(target):
        doc = target.__doc__
        generated = (
            inspect.isclass(target) and doc is not None and doc.startswith(f"{target.__name__}(")
        )  # a NamedTuple's or dataclass'
        return None if generated else doc
    package, name = public.rsplit(".", 1)
    return _attribute_docstring(package, name)


def test_every_public_name_has_a_docstring():
    missing = [
        public for public, obj in _public_names() if not (_docstring(public, obj) or "").strip()
    ]
    assert missing == []


# --- the quick start and the design notes ------------------------------------------------


@pytest.mark.parametrize("page", ["README.md", "docs/index.md", "docs/getting-started.md"])
def test_quick_start_commands_verbatim(page):
    blocks = [code.strip() for _, code in _fenced(ROOT / page, "bash")]
    for command in QUICK_START:
        assert command in blocks, f"{page} lacks the quick start's `{command}`"


def _slug(heading: str) -> str:
    """The anchor mkdocs gives a heading (its toc extension's default slugify)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_citations_of_the_design_notes_name_sections_that_exist():
    design = (DOCS / "design.md").read_text(encoding="utf-8")
    anchors = {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", design, re.MULTILINE)}
    sources = [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        *sorted((ROOT / "tests").glob("*.py")),
        *sorted((ROOT / "fnbp").rglob("*.py")),
        *PAGES,
    ]
    cited = {
        (path.name, m.group(1))
        for path in sources
        for m in re.finditer(r"design\.md#([\w-]+)", path.read_text(encoding="utf-8"))
    }
    assert cited, "nothing cites docs/design.md"
    assert sorted((where, anchor) for where, anchor in cited if anchor not in anchors) == []
