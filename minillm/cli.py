"""Dataclass configs on the command line and in JSON: the one config mechanism every script shares.

A script builds default config objects and hands them to `parse_args` with its arguments:

    model, train = parse_args(sys.argv[1:], GPTConfig.from_preset("mini"), TrainConfig())

Each dataclass field becomes an option: `--n_layer=6`, `--n-layer 6`, `--compile` (a bare boolean
means true), `--no-compile`, `--dropout none` for an optional field. Values are converted with the
field's annotated type (int, float, str, bool, Path, `X | None`, tuples and lists of those, comma
separated; a list field given more than once collects every value: `--input a --input b`). A key
that several configs share sets all of them; `--train.seed=1` sets one, the section being the class
name without "Config", lowercased (`GPTConfig` -> `gpt`). `--help` lists every field with its type,
default and the comment written beside it in the source.

Errors (an unknown option, with the closest known one suggested; a value of the wrong type; a value
that the dataclass's own `__post_init__` rejects) print one line and exit with status 2, as argparse
does. The library-level functions underneath raise `ValueError` instead, for tests and callers.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def section_name(config_or_class: Any) -> str:
    """`GPTConfig` -> "gpt", `TrainConfig` -> "train": the prefix of `--train.key=value`."""
    cls = config_or_class if isinstance(config_or_class, type) else type(config_or_class)
    name = cls.__name__
    return (name[: -len("Config")] if name.endswith("Config") and name != "Config" else name).lower()


def convert(raw: str, annotation: Any, name: str) -> Any:
    """Turn the command-line string `raw` into a value of the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(raw, option, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"--{name}: cannot parse {raw!r}")
    if origin is typing.Literal:
        for option in args:
            if str(option) == raw:
                return option
        raise ValueError(f"--{name}: expected one of {', '.join(map(str, args))}; got {raw!r}")
    if origin in (tuple, list):
        item_type = args[0] if args else str
        items = [convert(part.strip(), item_type, name) for part in raw.split(",") if part.strip()]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"--{name}: expected true or false, got {raw!r}")
    if annotation is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            # accept 1e6 and 3.0 when they are whole numbers: convenient for token counts
            try:
                value = float(raw)
            except ValueError:
                value = None
            if value is not None and value.is_integer():
                return int(value)
            raise ValueError(f"--{name}: expected an integer, got {raw!r}") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--{name}: expected a number, got {raw!r}") from None
    if annotation is str:
        return raw
    if annotation is Path:
        return Path(raw)
    raise ValueError(f"--{name}: fields of type {annotation!r} cannot be set from the command line")


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (string annotations from `from __future__` resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the `# comment` written on the field's line in the class source, if any."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    names = set(field_types(cls))
    line_names: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            line_names.setdefault(tok.start[0], tok.string)
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_names:
            comments[line_names[tok.start[0]]] = tok.string.lstrip("#").strip()
    return comments


def _type_label(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")


def format_help(*configs: Any, prog: str = "", description: str = "") -> str:
    """The `--help` text: a description, then every field of every config with its default."""
    out = [f"usage: {prog} [--key=value ...]".strip()]
    if description:
        out += ["", description.strip()]
    for config in configs:
        cls = type(config)
        comments = field_comments(cls)
        out += ["", f"{cls.__name__} (prefix --{section_name(cls)}.KEY when names clash):"]
        for name, annotation in field_types(cls).items():
            default = getattr(config, name)
            out.append(f"  --{name}={default!s:<14} {_type_label(annotation):<12} {comments.get(name, '')}")
    return "\n".join(out)


def parse_overrides(argv: list[str], *configs: Any) -> list[dict[str, Any]]:
    """Parse `argv` into one dict of typed values per config; raises ValueError on any bad option."""
    types_by_config = [field_types(type(c)) for c in configs]
    sections = [section_name(c) for c in configs]
    overrides: list[dict[str, Any]] = [{} for _ in configs]
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
        key, has_value, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        section, _, bare = key.rpartition(".")
        negated = False
        targets = _targets(bare, section, sections, types_by_config)
        if not targets and bare.startswith("no_") and not has_value:
            targets = _targets(bare[3:], section, sections, types_by_config)
            negated = bool(targets)
            bare = bare[3:] if negated else bare
        if not targets:
            known = sorted({n for t in types_by_config for n in t})
            close = difflib.get_close_matches(bare, known, n=1)
            hint = f"; did you mean --{close[0]}?" if close else " (see --help)"
            raise ValueError(f"unknown option --{key}{hint}")
        annotation = types_by_config[targets[0]][bare]
        if negated:
            if annotation is not bool:
                raise ValueError(f"--no-{bare} is only for true/false options")
            value: Any = False
        elif has_value:
            value = convert(raw, annotation, bare)
        elif annotation is bool:
            value = True
        elif i < len(argv) and not argv[i].startswith("--"):  # the next option is not this one's value
            value = convert(argv[i], annotation, bare)
            i += 1
        else:
            raise ValueError(f"--{bare} needs a value (--{bare}=VALUE or --{bare} VALUE)")
        for t in targets:
            # a list field given again accumulates: `--input a --input b` -> [a, b]
            if typing.get_origin(annotation) is list and bare in overrides[t]:
                overrides[t][bare] = overrides[t][bare] + value
            else:
                overrides[t][bare] = value
    return overrides


def _targets(name: str, section: str, sections: list[str], types_by_config: list[dict]) -> list[int]:
    """Indices of the configs that option `name` (optionally prefixed by `section`) sets."""
    return [
        i
        for i, field_map in enumerate(types_by_config)
        if name in field_map and (not section or section == sections[i])
    ]


def apply_overrides(configs: tuple, argv: list[str]) -> tuple:
    """The configs with the options in `argv` applied; each rebuilt so `__post_init__` re-validates."""
    overrides = parse_overrides(argv, *configs)
    return tuple(dataclasses.replace(c, **o) if o else c for c, o in zip(configs, overrides))


def parse_args(argv: list[str], *configs: Any, prog: str | None = None, description: str = ""):
    """Script entry point: apply `argv` to the default configs; `--help` prints fields and exits.

    Returns one config when one was given, else a tuple in the order given. On a bad option it
    prints `error: ...` to stderr and exits with status 2.
    """
    prog = prog or Path(sys.argv[0]).name
    if "-h" in argv or "--help" in argv:
        print(format_help(*configs, prog=prog, description=description))
        raise SystemExit(0)
    try:
        result = apply_overrides(configs, argv)
    except (ValueError, TypeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return result[0] if len(result) == 1 else result


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def from_dict(cls: type, data: dict[str, Any], *, source: str = "config") -> Any:
    """Rebuild `cls` from a dict read from JSON; an unknown key is an error naming `source`."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    known = field_types(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        annotation = known[name]
        origin = typing.get_origin(annotation)
        if annotation is Path and value is not None:
            value = Path(value)
        elif origin is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def format_config(*configs: Any) -> str:
    """The resolved configs as the one-block JSON a script prints at start."""
    return json.dumps({section_name(c): to_dict(c) for c in configs}, indent=2)
