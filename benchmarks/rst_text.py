"""A light reStructuredText-to-plain-text conversion for the benchmarks' character corpus.

:func:`rst_to_text` turns the ``*.rst.txt`` sources of the Python documentation (see
:func:`benchmarks.datasets.load_text_corpus`) into mostly plain English prose for a
character-level language model. It is a line-based heuristic, not a reST parser.
"""

from __future__ import annotations

import re

_HEADING_RE = re.compile(r"^\s*([=\-~^*#\"'`+:._])\1{2,}\s*$")
_DIRECTIVE_RE = re.compile(r"^\s*\.\.(\s|$)")
_DIRECTIVE_NAME_RE = re.compile(r"^\s*\.\.\s+([\w:-]+)::")
_TABLE_RULE_RE = re.compile(r"^\s*(\+[-=+]+\+|[=-]+(\s+[=-]+)+)\s*$")
_FIELD_OPTION_RE = re.compile(r"^\s*:[\w-]+:(\s+\S+)?\s*$")
_ROLE_RE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LINK_TARGET_RE = re.compile(r"\s*<[^<>`]*>$")
_LITERAL_RE = re.compile(r"``(.+?)``")
_INTERPRETED_RE = re.compile(r"`([^`]+)`_{0,2}")
_STRONG_RE = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPH_RE = re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])")
_SPACES_RE = re.compile(r"[ \t]+")
_FOOTNOTE_REF_RE = re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_")
# Directives whose indented body is prose worth keeping; the bodies of all other directives
# (code blocks, toctrees, index entries, tables, comments, ...) are dropped.
_PROSE_DIRECTIVES = frozenset(
    (
        "note",
        "warning",
        "important",
        "tip",
        "caution",
        "attention",
        "danger",
        "hint",
        "admonition",
        "seealso",
        "topic",
        "sidebar",
        "versionadded",
        "versionchanged",
        "deprecated",
        "deprecated-removed",
        "impl-detail",
        "only",
        "glossary",
        "function",
        "method",
        "classmethod",
        "staticmethod",
        "abstractmethod",
        "coroutinefunction",
        "coroutinemethod",
        "decorator",
        "decoratormethod",
        "class",
        "exception",
        "attribute",
        "data",
        "module",
        "describe",
        "opcode",
        "cmdoption",
        "option",
        "envvar",
        "pdbcommand",
        "availability",
        "c:function",
        "c:type",
        "c:member",
        "c:macro",
        "c:var",
        "c:struct",
        "c:data",
    )
)


def _strip_inline(line: str) -> str:
    """Remove common reST inline markup from one line, keeping the visible text."""

    def role(match: re.Match[str]) -> str:
        return _LINK_TARGET_RE.sub("", match.group(1)).lstrip("~!")

    line = _FOOTNOTE_REF_RE.sub("", line)
    line = _ROLE_RE.sub(role, line)
    line = _LITERAL_RE.sub(r"\1", line)
    line = _INTERPRETED_RE.sub(lambda m: _LINK_TARGET_RE.sub("", m.group(1)), line)
    line = _STRONG_RE.sub(r"\1", line)
    line = _EMPH_RE.sub(r"\1", line)
    line = line.replace("\\", "").replace("|", " ")
    if line.endswith(" ::") or line == "::":
        line = line[:-2]
    elif line.endswith("::"):
        line = line[:-1]
    return _SPACES_RE.sub(" ", line).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _skips_body(line: str) -> bool:
    """Whether ``line`` opens an indented block whose content should be dropped."""
    if _DIRECTIVE_RE.match(line):
        name = _DIRECTIVE_NAME_RE.match(line)
        return name is None or name.group(1) not in _PROSE_DIRECTIVES
    return line.endswith("::")  # a paragraph that introduces a literal (code) block


def _is_markup_only(line: str) -> bool:
    """Whether ``line`` carries no prose (directive, adornment, option, prompt, table rule)."""
    stripped = line.strip()
    return bool(
        _DIRECTIVE_RE.match(line)
        or _HEADING_RE.match(line)
        or _TABLE_RULE_RE.match(line)
        or _FIELD_OPTION_RE.match(line)
        or stripped.startswith((">>>", "... ", "$ "))
        or stripped == "..."
    )


def rst_to_text(source: str) -> str:
    """Lightly convert reStructuredText to plain text.

    Drops directive and comment lines (``.. xxx``) and, except for prose directives such as
    ``note`` or ``function``, their indented bodies; literal blocks introduced by ``::``; heading
    adornments, table rules, option lines and interactive ``>>>`` examples. Strips inline roles,
    literals and emphasis, removes indentation and keeps ASCII only. Heuristic, not a reST parser.
    """
    out: list[str] = []
    skip_indent: int | None = None  # indent of the line that opened a block being dropped
    for raw in source.expandtabs(8).splitlines():
        line = raw.rstrip()
        if skip_indent is not None:
            if not line or _indent(line) > skip_indent:
                continue
            skip_indent = None
        if not line:
            if out and out[-1]:
                out.append("")
            continue
        if _skips_body(line):
            skip_indent = _indent(line)
        if _is_markup_only(line):
            continue
        text = _strip_inline(line.strip()).encode("ascii", "ignore").decode("ascii")
        if text:
            out.append(text)
    return "\n".join(out).strip() + "\n"
