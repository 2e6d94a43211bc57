"""Every ```python block in README.md and docs/*.md runs here, so a documented snippet cannot rot.

Conventions (for anyone writing docs):

* Files are found by globbing ``README.md`` and ``docs/*.md`` at collection time: a new file or a
  new block is picked up without touching this test.
* The blocks of one file run in order, in one namespace (a later block may use names an earlier
  one defined), with the working directory set to a fresh temporary folder (files a snippet
  writes land there).
* A block may start with marker comments (any of its first lines, before the code):

  - ``# docs: slow`` -- the block needs the real default model (``sl.load_model()``). Such blocks
    run only in the slow tier; there the whole file runs, fast blocks included, in order. Fast
    blocks must therefore not depend on slow ones. In the fast tier, a block that loads the
    default model without this marker fails with a message saying so.
  - ``# docs: needs MODULE`` -- skip the file's remaining blocks (and say why) when ``MODULE``
    cannot be imported (``nnsight``, ``vllm``, a GPU-only package...). A block that imports
    ``nnsight`` is treated as ``needs nnsight`` automatically.
  - ``# docs: skip`` -- shown but never run; only for snippets that need something a test
    cannot have (a network service, a GPU). Prefer making the block run; pseudo-code belongs in
    a ```text block, not a ```python one.

* Only fences opened exactly as ```python (optionally followed by attributes) count; ```pycon,
  ```text and ```bash blocks are prose.
* A new page gets a row in README.md's feature map (checked here) and an entry in mkdocs.yml's
  nav (a page missing there is still built, listed under "More pages"). `make docs` builds the
  site with warnings as errors: links between pages are checked, and so are the docstrings the
  API reference renders (text like ``x[0]`` outside backticks or a doctest reads as a link).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import traceback
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^\n`]*)$")
_MARKER = re.compile(r"^#\s*docs:\s*(?P<what>\S+)(?:\s+(?P<arg>\S+))?\s*$")
_NNSIGHT_IMPORT = re.compile(r"^\s*(?:import nnsight|from nnsight\b)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Block:
    """One ```python block: its code, the line its first code line has, and its markers."""

    path: Path
    line: int
    code: str
    slow: bool
    skip: bool
    needs: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every docs/*.md, in a fixed order."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order (nested fences respected)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        ticks, info = match["ticks"], match["info"].strip()
        indent = len(match["indent"])
        start = i + 1
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close["ticks"].startswith(ticks) and not close["info"].strip():
                break
            i += 1
        body = [line[indent:] if line[:indent].isspace() else line for line in lines[start:i]]
        i += 1
        language = info.split()[0].lower() if info else ""
        if language != "python":
            continue
        slow, skip, needs = False, False, []
        for line in body:
            stripped = line.strip()
            if not stripped:
                continue
            marker = _MARKER.match(stripped)
            if marker is None:
                if stripped.startswith("#"):
                    continue
                break
            what, arg = marker["what"], marker["arg"]
            if what == "slow":
                slow = True
            elif what == "skip":
                skip = True
            elif what == "needs" and arg:
                needs.append(arg)
            else:
                raise ValueError(f"{path}:{start + 1}: unknown docs marker {stripped!r}")
        code = "\n".join(body)
        if _NNSIGHT_IMPORT.search(code) and "nnsight" not in needs:
            needs.append("nnsight")
        blocks.append(Block(path, start + 1, code, slow, skip, tuple(needs)))
    return blocks


def _cases() -> list[Any]:
    cases = []
    for path in doc_files():
        blocks = python_blocks(path)
        if not blocks:
            continue
        name = str(path.relative_to(ROOT))
        if any(not (block.slow or block.skip) for block in blocks):
            cases.append(pytest.param(path, False, id=name))
        if any(block.slow for block in blocks):
            cases.append(pytest.param(path, True, id=f"{name}[slow]", marks=pytest.mark.slow))
    return cases


def _run(block: Block, namespace: dict[str, Any]) -> None:
    # Padding with blank lines makes tracebacks point at the Markdown file's own line numbers.
    source = "\n" * (block.line - 1) + block.code
    try:
        exec(compile(source, str(block.path), "exec"), namespace)
    except Exception as error:
        trace = traceback.format_exc(limit=-8)
        raise AssertionError(
            f"the python block at {block.where} fails: {type(error).__name__}: {error}\n{trace}"
        ) from error


@pytest.mark.parametrize(("path", "slow_tier"), _cases())
def test_markdown_python_blocks_run(
    path: Path, slow_tier: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the file's blocks in order in one namespace (the fast tier leaves out slow blocks)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if not slow_tier:
        import steerlab.loading

        def refuse() -> Path:
            raise AssertionError(
                "a fast-tier doc block loads the real default model: start it with `# docs: slow`"
            )

        monkeypatch.setattr(steerlab.loading, "default_model_path", refuse)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    ran = 0
    for block in python_blocks(path):
        if block.skip or (block.slow and not slow_tier):
            continue
        missing = [m for m in block.needs if importlib.util.find_spec(m) is None]
        if missing:
            if ran == 0:
                pytest.skip(f"{block.where} needs {', '.join(missing)}")
            break  # later blocks may depend on this one; what ran so far passed
        _run(block, namespace)
        ran += 1
    if slow_tier:
        assert ran, f"{path.name}: the slow tier ran no block"


def test_markers_are_parsed(tmp_path: Path) -> None:
    """The harness itself: markers, fences, nnsight detection and line numbers."""
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```python\n# docs: slow\nx = 1\n```\n\n````python\n```python\nnot closed\n```\n"
        "````\n```text\nnope\n```\n```python\nfrom nnsight import save\n```\n"
        "```python\n# docs: skip\n# docs: needs vllm\ny = 2\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(doc)
    assert [b.line for b in blocks] == [3, 8, 16, 19]
    assert [(b.slow, b.skip, b.needs) for b in blocks] == [
        (True, False, ()),
        (False, False, ()),
        (False, False, ("nnsight",)),
        (False, True, ("vllm",)),
    ]
    assert blocks[1].code == "```python\nnot closed\n```"
    doc.write_text("```python\n# docs: sloow\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown docs marker"):
        python_blocks(doc)


def test_failures_name_the_markdown_line(tmp_path: Path) -> None:
    doc = tmp_path / "y.md"
    doc.write_text("intro\n\n```python\nok = 1\nraise KeyError('boom')\n```\n", encoding="utf-8")
    (block,) = python_blocks(doc)
    with pytest.raises(AssertionError) as caught:
        _run(dataclasses.replace(block, path=ROOT / "y.md"), {})
    assert "y.md:4" in str(caught.value) and 'y.md", line 5' in str(caught.value)


def test_every_doc_file_is_collected() -> None:
    names = {str(p.relative_to(ROOT)) for p in doc_files()}
    assert "README.md" in names
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= names


def test_site_hooks_fence_doctests_and_find_modules() -> None:
    """docs_hooks.py (the MkDocs site): doctest runs become code fences; API pages cover modules."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    text = "Intro.\n\n    >>> x = [1]\n    >>> x[0]\n    1\n\nAfter.\n>>> y"
    assert hooks.fence_doctests(text).splitlines() == [
        "Intro.",
        "",
        "    ```pycon",
        "    >>> x = [1]",
        "    >>> x[0]",
        "    1",
        "    ```",
        "",
        "After.",
        "```pycon",
        ">>> y",
        "```",
    ]
    modules = hooks.public_modules()
    assert {"steerlab", "steerlab.model", "steerlab.server.app", "steerlab.vllm"} <= set(modules)
    assert not [m for m in modules if any(part.startswith("_") for part in m.split("."))]


def test_every_docs_page_is_on_the_readme_map() -> None:
    """README.md's feature map is the way in: each docs/*.md page is linked from it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [
        p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name}" not in readme
    ]
    assert not missing, f"add a row to README.md's feature map for: {missing}"
