"""A static look at a Python file: could it define a model gradscope would load?

``gradscope analyze --skip-non-models`` (the pre-commit hook) reads each file
with :mod:`ast` before importing it, so ordinary Python files in a commit
(scripts, ``setup.py``, utilities) are neither executed nor made to pay for
importing torch. The test is conservative: it answers ``False`` only when the
loader (gradscope.loading.resolve_model) could not find a model in the file
whatever its imports do, that is when the file binds no ``build_model``, no
``model`` and no class with a base class at module level (nor ``global``
one of those names in a function), and has no ``from ... import *``.
Anything else is imported and looked at for real.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

#: Module-level names the loader looks for (gradscope.loading.resolve_model).
MODEL_NAMES = frozenset({"build_model", "model"})


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import: the body, and the blocks of if/try/with/for/while/match."""
    for node in body:
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue  # their bodies do not run at import (a class's names are not the module's)
        for field in ("body", "orelse", "finalbody"):
            yield from _module_level(getattr(node, field, []))
        for handler in getattr(node, "handlers", []):
            yield from _module_level(handler.body)
        for case in getattr(node, "cases", []):
            yield from _module_level(case.body)


def _own_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """The expressions of a statement, without the statements nested in it."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.stmt):
            yield child
            yield from _own_nodes(child)


def _binds_model_name(node: ast.stmt) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name in MODEL_NAMES
    if isinstance(node, ast.Import | ast.ImportFrom):
        return any((alias.asname or alias.name.split(".")[0]) in MODEL_NAMES
                   for alias in node.names)
    for sub in _own_nodes(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store | ast.Del):
            if sub.id in MODEL_NAMES:
                return True
        elif isinstance(sub, ast.MatchAs | ast.MatchStar) and sub.name in MODEL_NAMES:
            return True
    return False


def source_may_define_model(source: str | bytes, filename: str = "<file>") -> bool:
    """``False`` only when the source certainly defines nothing the loader would take."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return True  # let the import report it, with the line
    for node in _module_level(tree.body):
        if isinstance(node, ast.ClassDef) and (node.bases or node.keywords):
            return True  # may subclass nn.Module, directly or not
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return True
        if _binds_model_name(node):
            return True
    # A function run at import may bind them: `global model` anywhere counts.
    return any(isinstance(node, ast.Global) and MODEL_NAMES.intersection(node.names)
               for node in ast.walk(tree))


def may_define_model(path: Path) -> bool:
    """:func:`source_may_define_model` of a file; an unreadable file is left to the loader."""
    try:
        source = path.read_bytes()
    except OSError:
        return True
    return source_may_define_model(source, str(path))
