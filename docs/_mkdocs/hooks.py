"""MkDocs hooks of the peft_palora site: reference pages for modules still to come, and sections quoted from files.

Two jobs, both done on the Markdown before MkDocs renders it, so ``mkdocs build --strict`` keeps failing on anything
genuinely broken:

1. ``::: peft_palora.<module>`` (a mkdocstrings reference) whose module has no file in the source tree yet is
   replaced by a visible "not in this build" note instead of failing the build. Only a lower-case first component is
   treated as a module name: ``::: peft_palora.PaLoRAConfig`` is always handed to mkdocstrings. When the module
   lands, its reference renders with no change to the docs.

2. ``<!-- include: PATH -->`` or ``<!-- include: PATH#Heading text -->`` quotes a file of the repository (PATH is
   relative to the repository root) -- the whole file without its first-level title, or the section under the named
   heading without the heading itself. The quoted text is the file's current content, so numbers kept in
   ``README.md`` or ``benchmarks/paper/README.md`` are never copied by hand into the docs. Relative links in the
   quoted text are rewritten: images are copied into the site under ``_included/``; links to other repository files
   become inline code (the site has no pages for them). Quoted headings are shifted to nest under the page heading
   that precedes the directive. A file that does not exist yet renders as a "pending" note; a named heading that
   the file lacks fails the build.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.peft_palora")

# The reference line and the indented options block under it, if any.
_REFERENCE = re.compile(
    r"^:::\s+peft_palora\.(?P<module>[a-z_][a-z0-9_]*)(?P<rest>\S*)[ \t]*$(?P<options>(?:\n[ \t]+\S.*$)*)",
    re.MULTILINE,
)
_INCLUDE = re.compile(r"^<!--\s*include:\s*(?P<path>[^#\s]+)(?:#(?P<heading>[^>]*?))?\s*-->\s*$", re.MULTILINE)
_HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_INCLUDED_PREFIX = "_included"


def _repo_root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


# ---- 1. references to modules that do not exist yet ----------------------------------------------------------------


def _module_exists(root: Path, module: str) -> bool:
    package = root / "peft_palora"
    return (package / f"{module}.py").is_file() or (package / module / "__init__.py").is_file()


def _pending_reference(match: re.Match, root: Path, page_path: str) -> str:
    module = match.group("module")
    if _module_exists(root, module):
        return match.group(0)
    log.info("%s: peft_palora.%s is not in the source tree yet; rendering a placeholder.", page_path, module)
    return (
        '!!! warning "Not in this build yet"\n'
        f"    `peft_palora.{module}` is not in the source tree this site was built from. Its reference is generated "
        "from the docstrings as soon as the module is there.\n"
    )


# ---- 2. quoting sections of repository files -----------------------------------------------------------------------


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, text) of every Markdown heading outside fenced code."""
    found, in_fence = [], False
    for index, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        heading = None if in_fence else _HEADING.match(line)
        if heading:
            found.append((index, len(heading.group("hashes")), heading.group("text")))
    return found


def _extract(text: str, heading: str | None, source: str) -> str:
    lines = text.splitlines()
    headings = _headings(lines)
    if heading is None:
        if headings and headings[0][1] == 1:  # drop the document title; the docs page has its own
            lines = lines[: headings[0][0]] + lines[headings[0][0] + 1 :]
        return "\n".join(lines).strip()
    for position, (index, level, title) in enumerate(headings):
        if title == heading:
            end = next((i for i, lvl, _ in headings[position + 1 :] if lvl <= level), len(lines))
            return "\n".join(lines[index + 1 : end]).strip()
    available = ", ".join(repr(title) for _, _, title in headings) or "none"
    raise PluginError(f"include: {source} has no heading {heading!r} (headings: {available}).")


def _is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")))


def _included_images(text: str, source_dir: str, root: Path) -> list[str]:
    """Repository-relative paths of the existing images that ``text`` (quoted from ``source_dir``) shows."""
    images = []
    for link in _LINK.finditer(text):
        target = link.group("target")
        if link.group("bang") and _is_relative(target):
            path = posixpath.normpath(posixpath.join(source_dir, target))
            if (root / path).is_file():
                images.append(path)
    return images


def _rewrite_links(text: str, source_dir: str, page_dir: str) -> str:
    def replace(link: re.Match) -> str:
        target = link.group("target")
        if not _is_relative(target):
            return link.group(0)
        path = posixpath.normpath(posixpath.join(source_dir, target.split("#", 1)[0]))
        if link.group("bang"):
            image = posixpath.relpath(f"{_INCLUDED_PREFIX}/{path}", page_dir or ".")
            return f"![{link.group('text')}]({image}{link.group('title') or ''})"
        label = link.group("text")
        return f"`{path}`" if label.strip("`") == target else f"{label} (`{path}`)"

    return _LINK.sub(replace, text)


def _nest_headings(text: str, parent_level: int) -> str:
    """Shift the headings of ``text`` so that its top level sits one below ``parent_level`` (at most level 6)."""
    lines = text.splitlines()
    found = _headings(lines)
    if not found:
        return text
    shift = parent_level + 1 - min(level for _, level, _ in found)
    for index, level, title in found:
        lines[index] = f"{'#' * max(1, min(6, level + shift))} {title}"
    return "\n".join(lines)


def _parent_level(markdown: str, position: int) -> int:
    """Level of the last heading before ``position`` in the page (1 if none)."""
    found = _headings(markdown[:position].splitlines())
    return found[-1][1] if found else 1


def _quote(match: re.Match, root: Path, page_src: str, parent_level: int = 1) -> str:
    path, heading = match.group("path"), match.group("heading")
    heading = heading.strip() if heading else None
    source = root / path
    if not source.is_file():
        log.info("%s: %s is not in the tree yet; rendering a pending note.", page_src, path)
        return (
            '!!! note "Pending"\n'
            f"    `{path}` is not in the repository yet. Its numbers appear here once the benchmark that writes "
            "it has been run and committed.\n"
        )
    quoted = _extract(source.read_text(encoding="utf-8"), heading, path)
    quoted = _rewrite_links(quoted, posixpath.dirname(path), posixpath.dirname(page_src))
    quoted = _nest_headings(quoted, parent_level)
    where = f"`{path}`" + (f", section *{heading}*" if heading else "")
    return f"{quoted}\n\n<small>Quoted from {where} at build time.</small>\n"


# ---- MkDocs events --------------------------------------------------------------------------------------------------


def on_files(files: Files, config) -> Files:
    """Copy the images that quoted sections show into the site, under ``_included/<repository path>``."""
    root = _repo_root(config)
    wanted: set[str] = set()
    for page in files.documentation_pages():
        markdown = Path(page.abs_src_path).read_text(encoding="utf-8")
        for match in _INCLUDE.finditer(markdown):
            source = root / match.group("path")
            if source.is_file():
                heading = match.group("heading").strip() if match.group("heading") else None
                text = _extract(source.read_text(encoding="utf-8"), heading, match.group("path"))
                wanted.update(_included_images(text, posixpath.dirname(match.group("path")), root))
    for path in sorted(wanted):
        files.append(File.generated(config, f"{_INCLUDED_PREFIX}/{path}", abs_src_path=str(root / path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = _repo_root(config)
    src = page.file.src_uri
    markdown = _INCLUDE.sub(lambda match: _quote(match, root, src, _parent_level(markdown, match.start())), markdown)
    return _REFERENCE.sub(lambda match: _pending_reference(match, root, src), markdown)
