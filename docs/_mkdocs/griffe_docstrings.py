"""Griffe extension: make the project's docstrings render cleanly in Markdown without weakening strict checks.

Rewrites applied to each docstring before it is parsed:

1. Grouped parameter entries (``a, b, c: shared text``) become one entry per parameter.
2. Sphinx roles (``:func:`name` ``, ``:class:`~pkg.mod.Name` ``, ...) become inline code, because Markdown would show
   the role literally. The ``~`` form keeps only the last component, as Sphinx does.
3. Hugging Face style types in parameter entries (``name (`int`, *optional*):``) are dropped, so the reference shows
   the type from the signature (always in sync with the code) instead of the raw backticks.
4. Hugging Face style links (``[`PaLoRAModel`]``, which transformers' doc builder resolves) become inline code.
5. Code fences around ``>>>`` lines in an ``Example:`` section are removed: griffe renders ``>>>`` lines as code
   itself, and would otherwise show the fence lines as text.

Why 1: several docstrings document related parameters together, Hugging Face style::

    Args:
        sampler_mul, sampler_epsilon: the default sampler's schedule.

Griffe's Google parser reads that as ONE parameter named ``"sampler_mul, sampler_epsilon"``, warns that it is not in
the signature, and ``mkdocs build --strict`` fails. Turning the warning off would also hide real rot (a docstring that
documents a parameter the function no longer has), so instead this extension rewrites such an entry into one entry
per name, each with the shared description, before the docstring is parsed. Everything else is left untouched.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_SECTION = re.compile(
    r"^(?P<indent>\s*)(Args|Arguments|Params|Parameters|Other Parameters|Keyword Args|Keyword Arguments):\s*$"
)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|obj|data|exc|const):`(?P<tilde>~?)(?P<target>[^`]+)`")
_GROUPED = re.compile(
    r"^(?P<indent>\s+)(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)(?P<annotation>\s*\([^)]*\))?:(?P<rest>.*)$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


_HF_TYPED_ENTRY = re.compile(r"^(?P<head>\s+[A-Za-z_]\w*)\s*\([^)]*`[^)]*\):", re.MULTILINE)
_HF_LINK = re.compile(r"\[(?P<code>`[^`\]]+`)\](?![(\[])")


_EXAMPLES = re.compile(r"^(?P<indent>\s*)Examples?:\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)\w*\s*$")


def unfence_examples(docstring: str) -> str:
    """Drop fence lines inside ``Example:``/``Examples:`` sections (see rewrite 5)."""
    out, section_indent = [], None
    for line in docstring.splitlines():
        header = _EXAMPLES.match(line)
        if header:
            section_indent = len(header.group("indent"))
        elif section_indent is not None and line.strip() and _indent(line) <= section_indent:
            section_indent = None
        if section_indent is not None and _FENCE.match(line):
            continue
        out.append(line)
    return "\n".join(out)


def drop_hf_types(docstring: str) -> str:
    """``    name (`int`, *optional*): text`` -> ``    name: text`` inside parameter sections."""
    lines = docstring.splitlines()
    in_section, section_indent = False, 0
    for index, line in enumerate(lines):
        header = _SECTION.match(line)
        if header:
            in_section, section_indent = True, len(header.group("indent"))
            continue
        if in_section and line.strip() and _indent(line) <= section_indent:
            in_section = False
        if in_section:
            lines[index] = _HF_TYPED_ENTRY.sub(lambda match: f"{match.group('head')}:", line)
    return "\n".join(lines)


def split_grouped_parameters(docstring: str) -> str:
    """Return ``docstring`` with every grouped entry of a parameter section written out once per name."""
    lines = docstring.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        header = _SECTION.match(line)
        if header:
            section_indent = len(header.group("indent"))
            out.append(line)
            index += 1
            continue
        if section_indent is not None and line.strip() and _indent(line) <= section_indent:
            section_indent = None  # the parameter section ended
        grouped = _GROUPED.match(line) if section_indent is not None else None
        if grouped is None:
            out.append(line)
            index += 1
            continue
        item_indent = len(grouped.group("indent"))
        body = []
        index += 1
        while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > item_indent):
            body.append(lines[index])
            index += 1
        trailing_blanks = []
        while body and not body[-1].strip():  # blank lines after the entry stay after the last copy
            trailing_blanks.insert(0, body.pop())
        annotation = grouped.group("annotation") or ""
        for name in (part.strip() for part in grouped.group("names").split(",")):
            out.append(f"{grouped.group('indent')}{name}{annotation}:{grouped.group('rest')}")
            out.extend(body)
        out.extend(trailing_blanks)
    return "\n".join(out)


def replace_sphinx_roles(docstring: str) -> str:
    """``:func:`~a.b.c` `` -> `` `c` ``; ``:class:`a.B` `` -> `` `a.B` ``."""

    def replace(role: re.Match) -> str:
        target = role.group("target")
        return f"`{target.rsplit('.', 1)[-1] if role.group('tilde') else target}`"

    return _ROLE.sub(replace, docstring)


def fix_docstring(docstring: str) -> str:
    """All the rewrites of this module."""
    docstring = unfence_examples(drop_hf_types(split_grouped_parameters(docstring)))
    return _HF_LINK.sub(lambda match: match.group("code"), replace_sphinx_roles(docstring))


class DocstringFixes(Extension):
    """Apply :func:`fix_docstring` to every docstring griffe loads."""

    def on_instance(self, *, node: Any, obj: Object, agent: Any, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None:
            docstring.value = fix_docstring(docstring.value)
