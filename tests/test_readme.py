"""The Python examples of the repository's Markdown files run as written.

Each file's ```python blocks run in order in one namespace (a block may use what an earlier one
defined), in a temporary working directory where the repository's ``data/`` is reachable as
``data/``, so the examples write nothing in the repository. A block that raises fails the test
with the file and line where the block starts; tracebacks show the Markdown lines themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# An opening fence names the language; the block runs up to the next fence line.
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    """A ```python block: its code and the line of the file where the code starts (1-based)."""

    line: int
    code: str


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order."""
    return [
        Block(text.count("\n", 0, match.start(1)) + 1, match.group(1))
        for match in _FENCE.finditer(text)
    ]


def run_blocks(text: str, name: str) -> dict[str, Any]:
    """Run the Python blocks of ``text`` in order in one namespace and return it.

    Raises:
        AssertionError: from the exception of the first block that raises, naming
            ``name:line`` of that block.
    """
    namespace: dict[str, Any] = {"__name__": f"markdown_{Path(name).stem.lower()}"}
    for block in python_blocks(text):
        # Blank lines in front, so that line numbers in tracebacks are the file's.
        code = compile("\n" * (block.line - 1) + block.code, name, "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            raise AssertionError(
                f"{name}:{block.line}: the Python block starting at line {block.line} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return namespace


def _markdown_files() -> list[Path]:
    candidates = [*ROOT.glob("*.md"), *ROOT.glob("*/*.md")]
    return sorted(
        path
        for path in candidates
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
        and python_blocks(path.read_text(encoding="utf-8"))
    )


@pytest.fixture
def in_scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working directory with the repository's ``data/`` linked in."""
    (tmp_path / "data").symlink_to(ROOT / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_python_examples() -> None:
    assert README in _markdown_files()
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 3


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_markdown_python_blocks_run_in_order(path: Path, in_scratch_dir: Path) -> None:
    before = {item.name for item in ROOT.iterdir()}

    run_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))

    written = {item.name for item in in_scratch_dir.iterdir()} - {"data"}
    new_in_repo = {item.name for item in ROOT.iterdir()} - before
    assert not written & new_in_repo, "an example wrote in the repository"


# -- the runner itself ------------------------------------------------------------------------

_SAMPLE = """\
# Title

```sh
echo not python
```

```python
x = 1
```

Some prose.

```python
y = x + 1


assert y == 3, "y is " + str(y)
```
"""


def test_blocks_are_found_with_the_line_where_their_code_starts() -> None:
    blocks = python_blocks(_SAMPLE)
    assert [block.line for block in blocks] == [8, 14]
    assert blocks[0].code == "x = 1\n"
    assert _SAMPLE.splitlines()[blocks[1].line - 1] == "y = x + 1"


def test_blocks_share_one_namespace() -> None:
    namespace = run_blocks(_SAMPLE.replace("y == 3", "y == 2"), "SAMPLE.md")
    assert (namespace["x"], namespace["y"]) == (1, 2)


def test_a_block_that_raises_fails_with_its_line_number() -> None:
    with pytest.raises(AssertionError, match=r"^SAMPLE\.md:14: .*AssertionError: y is 2") as info:
        run_blocks(_SAMPLE, "SAMPLE.md")
    cause = info.value.__cause__
    assert isinstance(cause, AssertionError)
    frame = cause.__traceback__
    while frame is not None and frame.tb_frame.f_code.co_filename != "SAMPLE.md":
        frame = frame.tb_next
    assert frame is not None
    assert frame.tb_lineno == 17
