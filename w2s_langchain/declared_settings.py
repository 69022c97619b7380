"""Reading a settings declaration: the one place each setting is written.

A setting is a field of a frozen dataclass (`SearchSettings`, `Runtime`): its
type (string choices as a `Literal`), its default, its check (`__post_init__`)
and, on the line below it, one docstring. The surfaces built on the settings,
the components' fields and the command's flags, read them from here, so a
setting added to a dataclass shows up everywhere with its help.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from dataclasses import dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class Setting:
    """One declared setting."""

    name: str
    type: Any
    """The field's annotation, resolved (e.g. `int | None`, `Literal["max", "mean"]`)."""
    doc: str
    """The field's docstring, as written (indentation removed)."""
    secret: bool = False
    """Kept out of reprs (a field declared with repr=False, such as an API key)."""

    @property
    def options(self) -> tuple[Any, ...]:
        """The types a value may have: a union's members, else the type itself."""
        return get_args(self.type) if get_origin(self.type) in (Union, types.UnionType) else (self.type,)

    @property
    def choices(self) -> tuple[str, ...]:
        """The strings a `Literal` in the type allows; () when there is none."""
        return tuple(c for option in self.options if get_origin(option) is Literal for c in get_args(option))


@functools.cache
def declared_settings(declaration: type) -> tuple[Setting, ...]:
    """The settings a dataclass declares, in field order."""
    types = get_type_hints(declaration)
    docs = _attribute_docstrings(declaration)
    return tuple(Setting(f.name, types[f.name], docs.get(f.name, ""), secret=not f.repr) for f in fields(declaration))


def _attribute_docstrings(declaration: type) -> dict[str, str]:
    """The string under each annotated field in the class source, the base
    classes' first (Python keeps these docstrings nowhere, so they are parsed)."""
    docs: dict[str, str] = {}
    for cls in reversed(declaration.__mro__[:-1]):  # object has no source
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        except (OSError, TypeError):  # no source: a class made at run time
            continue
        for statement, following in zip(body, body[1:]):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs
