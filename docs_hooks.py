"""MkDocs hooks for the steerlab site (mkdocs.yml names this file; MkDocs runs it at build time).

* ``index.md`` is README.md, so the repository's front page and the site's home page are one
  text. README links to ``docs/X`` are rewritten to ``X``, which is where they live in the site.
* The "API reference" section is generated: one page per public module of ``src/steerlab`` (no
  path component starting with ``_``), each rendered by mkdocstrings from the docstrings, plus an
  overview of the ``steerlab`` facade linking every name in ``__all__`` to where it is defined.
  Modules are found on disk, so a module that is added, split or renamed needs no edit here.
* A ``docs/*.md`` page that the nav does not list is appended under "More pages", so a new page
  is never built but unreachable.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Any

import griffe
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "src" / "steerlab"
log = logging.getLogger("mkdocs.hooks.steerlab")


def public_modules() -> list[str]:
    """Dotted names of the public modules and packages under src/steerlab, sorted."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return sorted(names)


def _api_page(module: str) -> str:
    return f"api/{module}.md"


def _nav_pages(nav: Any) -> set[str]:
    pages: set[str] = set()
    if isinstance(nav, str):
        pages.add(nav)
    elif isinstance(nav, list):
        for item in nav:
            pages |= _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            pages |= _nav_pages(value)
    return pages


def on_config(config: Any) -> Any:
    nav = config["nav"]
    listed = _nav_pages(nav)
    docs = Path(config["docs_dir"])
    extra = sorted(p.name for p in docs.glob("*.md") if p.name not in listed)
    if extra:
        log.info("pages not in mkdocs.yml's nav, listed under 'More pages': %s", extra)
        nav.append({"More pages": extra})
    modules = [{"Overview": "api/index.md"}]
    modules += [{module: _api_page(module)} for module in public_modules() if module != "steerlab"]
    nav.append({"API reference": modules})
    return config


def _readme_as_index() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def _facade_overview() -> str:
    """The steerlab facade: its docstring, then every name of ``__all__`` linked to its home."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    homes: dict[str, str] = {}
    exported: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                homes[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported = list(ast.literal_eval(node.value))
    modules = set(public_modules())
    rows = []
    for name in exported:
        target = homes.get(name, f"steerlab.{name}")
        if target in modules:
            rows.append(f"| [`{name}`]({_api_page(target).removeprefix('api/')}) | module |")
        else:
            rows.append(f"| `sl.{name}` | [`{target}`][{target}] |")
    table = "\n".join(["| name | defined as |", "| --- | --- |", *rows])
    return (
        "# API reference\n\n"
        "::: steerlab\n    options:\n      members: false\n      show_root_heading: false\n\n"
        "## Names in `import steerlab as sl`\n\n"
        f"{table}\n\n"
        "Each module's own page (in the navigation) documents every public name it defines.\n"
    )


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "index.md", content=_readme_as_index()))
    files.append(File.generated(config, "api/index.md", content=_facade_overview()))
    for module in public_modules():
        if module == "steerlab":
            continue
        content = f"# `{module}`\n\n::: {module}\n"
        files.append(File.generated(config, _api_page(module), content=content))
    return files


def fence_doctests(text: str) -> str:
    """Put each run of doctest lines (a ``>>>`` line up to the next blank line) in a pycon fence.

    Docstrings here are plain text with doctest examples; Markdown would read ``>>>`` as nested
    quotes and ``x[0]`` as a link reference. tests/test_docs.py has the example.
    """
    out: list[str] = []
    indent: str | None = None  # the open fence's indentation, None when no fence is open
    for line in text.splitlines():
        stripped = line.lstrip()
        if indent is not None and not stripped:
            out.append(f"{indent}```")
            indent = None
        elif indent is None and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
        out.append(line)
    if indent is not None:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Griffe extension (mkdocs.yml loads it for mkdocstrings): fence every docstring's doctests."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
