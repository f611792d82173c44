"""The config reference (Markdown), generated from the config models so the docs cannot drift."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from cltune.config import (
    BaseRunConfig,
    DataSettings,
    EvalSettings,
    LoraSettings,
    ModelSettings,
    PhaseSettings,
)


def _type(annotation) -> str:
    """`int or 'auto' or None`: readable, and free of the bare | that would split a Markdown table."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if annotation is type(None):
        return "None"
    if args:
        return str(annotation).replace("typing.", "").replace("pathlib.", "").replace("|", "or")
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return ("{}" if value == {} else "[]" if value == [] else "see below" if isinstance(value, BaseModel)
                else repr(value))
    if field.is_required():
        return "required"
    return str(field.default) if hasattr(field.default, "as_posix") else repr(field.default)


def _title(title: str, level: int | None) -> str:
    """A section's title: bold (the CLI's printout) or a Markdown heading (the docs site, whose table of contents
    lists it)."""
    return f"**`{title}`**" if level is None else f"{'#' * level} `{title}`"


def section(title: str, model: type[BaseModel], level: int | None = None) -> list[str]:
    lines = [_title(title, level), "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        lines.append(f"| `{key}` | {_type(field.annotation)} | `{_default(field)}` | {_cell(field.description)} |")
    return lines + [""]


def config_reference(level: int | None = None) -> str:
    """Every config key with its type, default and meaning; `level` makes each section's title a heading of that
    level."""
    from cltune.strategies import REGISTRY

    top = {k: v for k, v in BaseRunConfig.model_fields.items()}
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in top.items():
        lines.append(f"| `{name}` | `{_default(field)}` | {_cell(field.description)} |")
    lines.append("")
    for title, model in (("model", ModelSettings), ("lora", LoraSettings), ("data", DataSettings),
                         ("train / phases[i] (phaseK.* in --set)", PhaseSettings), ("eval", EvalSettings)):
        lines += section(title, model, level)
    keys = "`path` (required), `name`, `speaker_col`, `text_col`, `conversation_col`."
    lines += ([f"`tasks[i]`: {keys}"] if level is None
              else [_title("tasks[i]", level), "", f"Each task's keys: {keys}"]) + [""]
    for name, model in REGISTRY.sections().items():
        lines += section(name, model, level)
    return "\n".join(lines)


def _cell(text: str | None) -> str:
    """A description as one Markdown table cell: a `|` in it would end the cell."""
    return (text or "").replace("|", "\\|")
