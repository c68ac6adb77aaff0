"""The embedded default corpus: English text that ships with every Python installation, so that
`prepare.py` with no input works offline on any machine, and `make demo` has something to train on.

Two kinds of documents (about 2.2 MB in all on Python 3.11; the exact text follows the Python that
runs it, so the corpus is the same on every machine with the same Python version):
- "pydoc-topic": the documentation topics `help()` shows (`pydoc_data.topics`: the language
  reference on `if`, `with`, string methods, formatting, ...), one document per topic.
- "stdlib-docstrings": one document per standard-library module: its docstring followed by those of
  its public classes, methods and functions, each under a `class Name` / `def Name.method` line.
  Modules are read with `ast`, never imported, so nothing in them runs (`import antigravity` would
  open a browser). Test suites, IDLE's tests, turtledemo and site-packages are left out.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from minillm.sources import Document


_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo"}


def default_corpus() -> Iterator[Document]:
    """English text every Python installation has, so `prepare.py` works offline anywhere: the
    pydoc documentation topics (label "pydoc-topic", about 0.5 MB) and, per standard-library
    module, its docstring followed by those of its public classes and functions (label
    "stdlib-docstrings", about 1.8 MB). Read with `ast`, never imported: no module runs."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship Python without its documentation
        topics = {}
    for name in sorted(topics):
        yield Document(topics[name], f"pydoc_data.topics:{name}", "pydoc-topic")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = [d for d in subfolders if d not in _SKIP_PARTS]  # prune: never enter them
        files += [Path(folder, n).relative_to(stdlib) for n in names if n.endswith(".py")]
    for relative in sorted(files):
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        text = module_docstrings(stdlib / relative, module)
        if text:
            yield Document(text, f"stdlib:{relative.as_posix()}", "stdlib-docstrings")


def module_docstrings(path: Path, module: str) -> str:
    """A module's docstring and its public classes' and functions' docstrings as one text."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    not child.name.startswith("_"):
                doc = ast.get_docstring(child)
                kind = "class" if isinstance(child, ast.ClassDef) else "def"
                if doc:
                    parts.append(f"{kind} {prefix}{child.name}\n{doc}")
                if kind == "class":
                    visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return "\n\n".join(parts)
