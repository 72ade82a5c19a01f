"""The share of lstm/ and tune/ that is docstrings and comments: the lines of module, class and
function docstrings (``ast``) plus the lines that are only a comment (``tokenize``), over all
lines of the .py files. A comment after code on its line is counted apart, as ``inline_comments``.

    python bench/doc_share.py [lstm tune]

Prints one JSON line: the share overall, the line counts, and the five files with the most such lines.
"""

from __future__ import annotations

import ast
import io
import json
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstring_lines(source: str) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, DOCUMENTED) and ast.get_docstring(node, clean=False) is not None:
            first = node.body[0]
            lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def comments(source: str) -> tuple[set[int], set[int]]:
    """The lines that are only a comment, and those with a comment after code."""
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    found = {t.start[0] for t in tokens if t.type == tokenize.COMMENT}
    alone = {n for n in found if lines[n - 1].lstrip().startswith("#")}
    return alone, found - alone


def count(path: Path) -> dict[str, int]:
    source = path.read_text()
    alone, inline = comments(source)
    return {"lines": len(source.splitlines()), "doc": len(docstring_lines(source) | alone), "inline": len(inline)}


def share(packages: list[str]) -> dict:
    files = {str(p.relative_to(REPO)): count(p) for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))}
    lines = sum(f["lines"] for f in files.values())
    doc = sum(f["doc"] for f in files.values())
    top = sorted(files, key=lambda f: files[f]["doc"], reverse=True)[:5]
    return {
        "bench": "doc_share",
        "packages": packages,
        "share": round(doc / lines, 4),
        "doc_lines": doc,
        "lines": lines,
        "inline_comments": sum(f["inline"] for f in files.values()),
        "files": len(files),
        "most": {f: f"{files[f]['doc']}/{files[f]['lines']}" for f in top},
    }


if __name__ == "__main__":
    print(json.dumps(share(sys.argv[1:] or ["lstm", "tune"])))
