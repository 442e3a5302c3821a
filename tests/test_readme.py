"""Every Python block of README.md runs as pasted, in order, in one namespace (a later block may use
what an earlier one defined, as a reader's session would).

A block that cannot run here is marked by the line ``<!-- not-run: REASON -->`` just before its
fence; it is still compiled, and reported as a warning naming its line and reason, so that nothing
is skipped silently."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason given by a not-run marker, or None


def python_blocks(text: str) -> list[Block]:
    """The fenced blocks whose info string is ``python`` or ``py``, with their not-run markers.

    A marker applies to the block whose fence follows it, blank lines allowed in between."""
    lines = text.splitlines()
    blocks, i, marker = [], 0, None
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            found = NOT_RUN.search(lines[i])
            if found:
                marker = found["reason"] or "no reason given"
            elif lines[i].strip():
                marker = None
            i += 1
            continue
        fence, start = opening["fence"], i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(opening["indent"]) :])
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md line {start + 1}: code block never closed")
        i += 1
        if opening["info"].lower() in ("python", "py"):
            blocks.append(Block(start + 1, "\n".join(body) + "\n", marker))
        marker = None
    return blocks


def test_the_block_parser_finds_fences_markers_and_languages():
    text = "\n".join(
        [
            "intro",
            "```python",
            "a = 1",
            "```",
            "```bash",
            "echo no",
            "```",
            "<!-- not-run: needs a GPU -->",
            "",
            "```py",
            "b = a + 1",
            "```",
            "<!-- not-run: stale -->",
            "text between: the marker no longer applies",
            "```python",
            "c = 3",
            "```",
        ]
    )
    assert python_blocks(text) == [
        Block(2, "a = 1\n", None),
        Block(10, "b = a + 1\n", "needs a GPU"),
        Block(15, "c = 3\n", None),
    ]
    with pytest.raises(AssertionError, match="line 1: code block never closed"):
        python_blocks("```python\nx = 1\n")


def test_every_python_block_of_the_readme_runs_in_order(monkeypatch, tmp_path):
    blocks = python_blocks(README.read_text())
    runnable = [b for b in blocks if b.not_run is None]
    assert runnable, "README.md has no runnable Python block"
    matplotlib.use("Agg")  # figures are drawn, never shown
    monkeypatch.chdir(tmp_path)  # files a block writes stay out of the repository
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        # Every block must at least compile; tracebacks give README.md's own line numbers.
        code = compile("\n" * block.line + block.code, str(README), "exec")
        if block.not_run is not None:
            warnings.warn(f"README.md line {block.line}: not run ({block.not_run})", UserWarning, stacklevel=1)
            continue
        try:
            exec(code, namespace)
        except Exception as err:
            raise AssertionError(f"README.md block at line {block.line} failed: {err!r}") from err
