"""Typed dataclass configs mapped 1:1 onto typer options: a field's name is its flag, its `help` its help text.

`flag()` declares a field; `command_from()` turns a dataclass into a typer command whose options are its fields,
plus `--config FILE` (YAML or JSON, flags override it); `write_config` writes the resolved options back as such a
file. `Choice` enums, `to_choice`, `at_least` and `resolve_device` are the checks every config shares.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import inspect
import json
import os
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import typer

from .errors import ConfigError, GenrecalError

C = TypeVar("C", bound=Enum)
SECRET_OPTIONS = ("storage_options",)  # hold credentials: recorded with them masked (`redact_storage_options`)


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


def _options(cls: type) -> dict[str, Any]:
    """Each option field of `cls` and its type (Optional unwrapped)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata and f.name != "command":
            annotation = hints[f.name]
            if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
                annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
            out[f.name] = annotation
    return out


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """A config file's value as the option's type, or a ConfigError naming the key."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin is list:
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (annotation is int and value != int(value)):
            raise ConfigError(f"{where} must be {'an integer' if annotation is int else 'a number'}, got {value!r}")
        return annotation(value)
    if isinstance(value, (dict, list)):  # e.g. processor_kwargs written as a mapping
        return json.dumps(value)
    return Path(value) if annotation is Path else str(value)


def read_config(path: Path, cls: type) -> dict[str, Any]:
    """The options in a YAML or JSON file (keys: option names, with `_` or `-`); an unknown key is an error
    naming the closest option."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"--config {path}: not valid {kind}: {str(e).splitlines()[0]}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must map option names to values, got a {type(data).__name__}")
    options, out = _options(cls), {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=1)
            hint = f"; did you mean {close[0].replace('_', '-')}?" if close else " (see --help for the options)"
            raise ConfigError(f"--config {path}: unknown option {key!r}{hint}")
        out[name] = _coerce(value, options[name], f"--config {path}: {key}")
    return out


def write_config(cfg: Any, path: Path | Any) -> None:
    """The resolved options of `cfg` as YAML (atomically), at a path or a `Location`: `--config` of it repeats the
    run."""
    import yaml

    values = {}
    for name in _options(type(cfg)):
        v = getattr(cfg, name)
        values[name] = v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v
        if name in SECRET_OPTIONS:
            from .locations import redact_storage_options

            values[name] = redact_storage_options(v)
    from .locations import Location

    text = f"# {' '.join(getattr(cfg, 'command', None) or [])}\n" + yaml.safe_dump(values, sort_keys=False)
    Location.of(path).write_bytes(text.encode())  # whole: a temporary file renamed locally, one PUT remotely


def command_from(cls: type, run: Callable[[Any], None], skip: tuple[str, ...] = ("command",)) -> Callable[..., None]:
    """A function whose signature typer reads as one option per field of `cls`, plus `--config FILE`, calling
    `run(cls(**options))`; a `GenrecalError` prints its message and exits with its `exit_status` (2; a
    `TeacherFailure` 3)."""
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],  # noqa: UP007, UP045
                                default=typer.Option(None, help="Read options from this YAML or JSON file (keys: the "
                                                     "option names, with _ or -); options given here override it."))]
    required = []
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        annotation = hints[f.name]
        if f.default is dataclasses.MISSING:  # required, on the command line or in --config
            required.append(f.name)
            option = typer.Option(None, help=f.metadata["help"] + " [required]", show_default=False)
        elif annotation is bool:
            option = typer.Option(f.default, f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}",
                                  help=f.metadata["help"])
        else:
            option = typer.Option(f.default, help=f.metadata["help"])
        if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
            inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
            annotation = typing.Optional[inner]  # noqa: UP007, UP045 (typer reads Optional, not X | None)
        elif f.name in required:
            annotation = typing.Optional[annotation]  # noqa: UP007, UP045
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))

    def command(ctx: typer.Context, config: Path | None = None, **options: Any) -> None:
        try:
            if config is not None:
                for name, value in read_config(config, cls).items():
                    source = ctx.get_parameter_source(name)
                    if getattr(source, "name", None) != "COMMANDLINE":  # the command line wins over the file
                        options[name] = value
            missing = [f"--{n.replace('_', '-')}" for n in required if options.get(n) is None]
            if missing:
                raise ConfigError(f"missing {', '.join(missing)}: give it on the command line or in --config")
            run(cls(**options))
        except GenrecalError as e:  # a user error: its fix in one line, no traceback
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(e.exit_status) from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Wherever the disk filled (a store's head, a checkpoint, a plot): what is committed is kept.
            typer.secho(f"error: out of disk space ({e.strerror}{f': {e.filename}' if e.filename else ''}). "
                        "Everything committed so far is kept: free space and re-run the same command (train-student "
                        "with --resume) to continue.", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = cls.__doc__
    return command


def config_from(cls: type, path: Path, **options: Any) -> Any:
    """`cls` from a config file with `options` over it (as the command line does), for Python callers."""
    return cls(**{**read_config(path, cls), **options})


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


def run_app(cls: type, run: Callable[[Any], None], name: str) -> None:
    """Run one typer command whose options are the fields of `cls`. Help is plain text (`rich_markup_mode=None`):
    brackets in it, as in `genrecal[lora]`, `hidden_states[k]` or `[required]`, are shown, not read as markup."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=cls.__doc__, rich_markup_mode=None)
    app.command(name=name, help=cls.__doc__)(command_from(cls, run))
    app(prog_name=name)
