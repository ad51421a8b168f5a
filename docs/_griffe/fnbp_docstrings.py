"""Griffe extension of the docs build: fnbp's docstrings, written for the source, as Markdown.

fnbp's docstrings are Google style with a few reStructuredText habits that read well in the
source and in ``help()``: cross-reference roles (:func:`fit`), literal blocks introduced by
``::``, one simple table, and the notes' notation B[M, z](v), which Markdown would take for a
link. This extension rewrites each docstring before mkdocstrings parses it; the docstrings
themselves stay as they are:

- ``:func:`x```, ``:class:`x```, ``:mod:`x``` ... -> ```x``` (code);
- ``[text](target)`` and ``[text][ref]`` outside code, where the target is not a URL ->
  ``\\[text](target)``, so B[relu, z](v) and x[0][1] stay text;
- a line ending in ``::`` -> ``:`` (the indented block below it is a code block already);
- a simple reST table (``====  ====`` borders) -> a Markdown table;
- an argument entry naming several arguments (``z, W, b: ...``, in ``Args:``) -> one entry
  per argument with the same description, as Google style has one name per entry.

Code spans, indented code and fenced code are left untouched.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|attr|meth|exc|obj|const|type):`~?([^`]+)`")
_CODE_SPAN = re.compile(r"(``.+?``|`[^`\n]+`)")
_BRACKETS = re.compile(r"\[([^\[\]\n]*)\](?=[(\[])")
_URL_LINK = re.compile(r"\[[^\[\]\n]*\]\((?:https?://|mailto:)[^)\s]*\)")
_BORDER = re.compile(r"^(\s*)=+(?: +=+)+\s*$")
_ARGS = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s+)(\**[A-Za-z_]\w*(?:, \**[A-Za-z_]\w*)+):(.*)$")


def _outside_code(text: str, rewrite) -> str:
    """``rewrite`` applied to the parts of one line that are not code spans."""
    parts = _CODE_SPAN.split(text)
    return "".join(part if i % 2 else rewrite(part) for i, part in enumerate(parts))


def _escape_brackets(text: str) -> str:
    urls = []

    def keep(match):
        urls.append(match.group(0))
        return f"\x00{len(urls) - 1}\x00"

    text = _URL_LINK.sub(keep, text)
    text = _BRACKETS.sub(lambda m: "\\[" + m.group(1) + "]", text)
    return re.sub("\x00(\\d+)\x00", lambda m: urls[int(m.group(1))], text)


def _prose(line: str) -> str:
    line = _ROLE.sub(lambda m: f"`{m.group(1)}`", line)
    line = _outside_code(line, _escape_brackets)
    if line.rstrip().endswith("::"):
        line = line.rstrip()[:-1]
        if not line.strip(" :"):
            line = ""
    return line


def _table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """The simple reST table whose top border is ``lines[start]``, as Markdown, and its end."""
    border = lines[start]
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]
    borders = [i for i in range(start, len(lines)) if lines[i] == border]
    if len(borders) < 3:
        return None
    header, body_end = borders[1], borders[2]

    def cells(line: str) -> list[str]:
        return [
            line[a : b if k + 1 < len(spans) else None].strip() for k, (a, b) in enumerate(spans)
        ]

    rows = [cells(lines[i]) for i in range(start + 1, header)]
    body = [cells(lines[i]) for i in range(header + 1, body_end) if lines[i].strip()]
    out = ["| " + " | ".join(row) + " |" for row in rows]
    out.append("|" + "|".join(" --- " for _ in spans) + "|")
    out += ["| " + " | ".join(_prose(c) for c in row) + " |" for row in body]
    return ["", *out, ""], body_end + 1


def _one_name_per_entry(lines: list[str]) -> list[str]:
    """``a, b: text`` entries of an ``Args:`` section as one entry per name."""
    out: list[str] = []
    section: int | None = None  # the indent of the Args: line we are in
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if line.strip() and section is not None and indent <= section:
            section = None
        if (match := _ARGS.match(line)) is not None:
            section = len(match.group(1))
        elif section is not None and (match := _GROUPED.match(line)) is not None:
            item_indent, names, first = match.groups()
            body = []
            while i + 1 < len(lines) and (
                not lines[i + 1].strip()
                or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > len(item_indent)
            ):
                body.append(lines[i + 1])
                i += 1
            while body and not body[-1].strip():
                i -= 1
                body.pop()
            for name in names.split(", "):
                out += [f"{item_indent}{name}:{first}", *body]
            i += 1
            continue
        out.append(line)
        i += 1
    return out


def markdown(docstring: str) -> str:
    """One docstring, rewritten as described in the module doc."""
    lines = _one_name_per_entry(docstring.split("\n"))
    out: list[str] = []
    fenced = False
    prose_indent = 0  # the indent of the last line of prose
    in_code = False  # inside an indented code block
    blank = True  # the previous line was blank
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
        if fenced or stripped.startswith(("```", "~~~")):
            out.append(line)
        elif not stripped:
            out.append(line)
        elif _BORDER.match(line) and (table := _table(lines, i)) is not None:
            rows, i = table
            out += rows
            in_code, blank = False, True
            continue
        elif in_code and indent >= prose_indent + 4:
            out.append(line)
        elif blank and indent >= prose_indent + 4:
            in_code = True
            out.append(line)
        else:
            in_code = False
            prose_indent = indent
            out.append(_prose(line))
        blank = not stripped
        i += 1
    return "\n".join(out)


class FnbpDocstrings(griffe.Extension):
    """Rewrites every docstring with :func:`markdown` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
