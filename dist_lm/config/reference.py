"""The config reference (docs/configuration.md's tables), generated from the dataclasses' field docstrings.

Python keeps no docstrings for attributes at run time, so they are read from the schema's source.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import typing
from pathlib import Path

from dist_lm.config import model_section, run_sections
from dist_lm.config import schema as config
from dist_lm.config.io import type_name


def field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field name: docstring}} for every dataclass of the schema."""
    classes = [
        n
        for module in (config, model_section, run_sections)
        for n in ast.parse(inspect.getsource(module)).body
        if isinstance(n, ast.ClassDef)
    ]
    docs: dict[str, dict[str, str]] = {}
    for cls in classes:
        fields = docs.setdefault(cls.name, {})
        for stmt, after in zip(cls.body, cls.body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
            ):
                fields[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def reference_markdown() -> str:
    docs = field_docs()
    out = []
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        out += [
            f"### `{section.name}`: {' '.join((cls.__doc__ or '').split())}",
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(
                f"| `{section.name}.{f.name}` | {type_name(hints[f.name])} | `{json.dumps(default)}` | "
                f"{docs[cls.__name__].get(f.name, '')} |"
            )
        out.append("")
    return "\n".join(out)


START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def embedded_reference(text: str) -> str:
    """The reference as embedded in a page (docs/configuration.md) between the markers."""
    return text[text.index(START) + len(START) : text.index(END)]


def update_page(path: Path) -> None:
    """Rewrite the reference between the page's markers."""
    text = path.read_text()
    path.write_text(text.replace(embedded_reference(text), reference_markdown() + "\n"))
