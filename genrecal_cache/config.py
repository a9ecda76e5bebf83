"""Typed dataclass configs mapped 1:1 onto typer options: a field's name is its flag, its `help` its help text.

`flag()` declares a field; `command_from()` turns a dataclass into a typer command whose options are its fields;
`Choice` enums, `to_choice`, `at_least` and `resolve_device` are the checks every config shares.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import typer

from .errors import ConfigError, GenrecalError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A flag's fixed set of values: typer lists them in --help and refuses any other; compares equal to its
    string value, and prints as it."""

    def __str__(self) -> str:
        return self.value


def to_choice(cls: type[C], value: Any, flag: str) -> C:
    """`value` (a member or its string, as Python callers pass it) as a member of `cls`."""
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{flag} must be one of {', '.join(m.value for m in cls)}, got {value!r}") from None


def at_least(cfg: Any, minimum: int, *names: str) -> None:
    """Every named field of `cfg` is >= minimum, else a ConfigError naming its flag."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def json_object(text: str, flag: str) -> dict[str, Any]:
    """A flag holding a JSON object ('' is {})."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} must be a JSON object like '{{\"max_pixels\": 1003520}}': {e.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def resolve_device(device: str) -> str:
    """--device auto: cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def flag(help: str, default: Any = dataclasses.MISSING) -> Any:
    """A config field shown as `--name` with this help; no default makes it required."""
    return dataclasses.field(default=default, metadata={"help": help})


def command_from(cls: type, run: Callable[[Any], None], skip: tuple[str, ...] = ("command",)) -> Callable[..., None]:
    """A function whose signature typer reads as one option per field of `cls`, calling `run(cls(**options))`;
    a `GenrecalError` prints its message and exits with status 2."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        annotation = hints[f.name]
        if f.default is dataclasses.MISSING:
            option = typer.Option(..., help=f.metadata["help"], show_default=False)
        elif annotation is bool:
            option = typer.Option(f.default, f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}",
                                  help=f.metadata["help"])
        else:
            option = typer.Option(f.default, help=f.metadata["help"])
        if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
            inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
            annotation = typing.Optional[inner]  # noqa: UP007, UP045 (typer reads Optional, not X | None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))

    def command(**options: Any) -> None:
        try:
            run(cls(**options))
        except GenrecalError as e:  # a user error: its fix in one line, no traceback
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = cls.__doc__
    return command


def to_argv(cfg: Any, skip: tuple[str, ...] = ("command",), changed_only: bool = False) -> list[str]:
    """The command-line options that rebuild `cfg` (the inverse of `command_from`), e.g. to start a copy of a
    job in a subprocess; `changed_only` leaves out options at their default (to show a command)."""
    argv = []
    for f in dataclasses.fields(cfg):
        if f.name in skip or "help" not in f.metadata:
            continue
        value, name = getattr(cfg, f.name), f.name.replace("_", "-")
        if changed_only and f.default is not dataclasses.MISSING and str(value) == str(f.default):
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv
