"""YAML presets and dotted overrides -> :class:`~dist_lm.config.schema.Config`.

The dataclass tree is the schema: a YAML file is a nested mapping of its fields, and an override
``section.field=value`` sets one leaf. Unknown keys are rejected with the closest valid key,
values are checked against the field's annotation, and every error names the file (or the
command line) and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_lm.config import hugging_face
from dist_lm.config.errors import MAX_INT
from dist_lm.config.schema import Config, ConfigError, ModelConfig
from dist_lm.config.yaml_files import read_yaml

CONFIGS_DIR = Path(__file__).resolve().parent / "presets"  # package data; a checkout's configs/ links here
COMMAND_LINE = "command line"


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a preset in configs/ (``debug`` or ``debug.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = CONFIGS_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and preset.is_file():
        return preset
    raise ConfigError("--config", f"no such file or preset '{name_or_path}'; presets: {', '.join(available_presets())}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, source: str | None, value: Any = None) -> ConfigError:
    """The error for a key the schema does not have, with the closest valid one. ``value``: what
    it was given (for a misspelt section, a mapping of its fields)."""
    leaf = key.rsplit(".", 1)[-1]
    close: list[str] = []
    if isinstance(value, dict):  # a section spelt wrong (trian.max_steps): the section first
        sections = [f.name for f in dataclasses.fields(Config) if f.name != "preset"]
        near = difflib.get_close_matches(leaf, sections, n=1, cutoff=0.5)
        fields = [f"{near[0]}.{field}" for field in value] if near else []
        close = [k for k in fields if k in all_keys()][:1] or near
    # A right field in the wrong section first (train.lr -> optim.lr), then the closest spelling.
    close = close or [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(key, f"unknown key{hint}", source)


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


class _OutOfRange(ValueError):
    """A value of the right type that no field takes (inf, nan, an integer past MAX_INT)."""


def _coerce(value: Any, hint: Any) -> Any:
    """Return value as the annotated type, or raise ValueError (_OutOfRange: with what is wrong).
    Strings come from overrides."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        refused = None
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option)
            except _OutOfRange as e:
                refused = e
            except ValueError:
                pass
        raise refused or ValueError()
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        raise ValueError
    if typing.get_origin(hint) is Literal:
        for choice in typing.get_args(hint):
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):  # "a,b" from an override
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError
        return [_coerce(v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError
    if hint is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):  # "1e6" from an override
            value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            value = int(value)
        if not isinstance(value, int):
            raise ValueError
        if abs(value) > MAX_INT:
            raise _OutOfRange(f"{value} is out of range (at most 2**53 = {MAX_INT:,})")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)  # ints and strings like "3e-4" (which YAML 1.1 reads as a string)
        if not math.isfinite(number):
            raise _OutOfRange(f"must be a finite number, got {value}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return getattr(value, "text", None) or str(value)  # a YAML number keeps its text
        raise ValueError
    raise TypeError(f"unsupported annotation {hint!r}")


def build(cls: type, data: dict, sources: dict[str, str], prefix: str = "") -> Any:
    """Construct ``cls`` from a nested mapping, checking every key and value."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            source = sources.get(dotted) or next((v for k, v in sources.items() if k.startswith(f"{dotted}.")), None)
            raise _unknown_key(dotted, source, value)
        hint = hints[key]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(item):  # a list of mappings, each one of these dataclasses
            fields = ", ".join(f"{f.name}: ..." for f in dataclasses.fields(item) if f.default is dataclasses.MISSING)
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(
                    dotted,
                    f"expected a list of mappings like [{{{fields}}}, ...] (on the command line "
                    f"in quotes), got {value!r}",
                    sources.get(dotted),
                )
            kwargs[key] = [build(item, v, sources, f"{dotted}[{i}].") for i, v in enumerate(value)]
            continue
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(dotted, "must be a mapping of its fields", sources.get(dotted))
            kwargs[key] = build(hint, value, sources, f"{dotted}.")
            continue
        if isinstance(value, dict):
            source = next((v for k, v in sources.items() if k.startswith(f"{dotted}.")), None)
            raise ConfigError(dotted, f"'{key}' is not a section; set it as {dotted}=VALUE", source)
        try:
            kwargs[key] = _coerce(value, hint)
        except _OutOfRange as e:
            raise ConfigError(dotted, str(e), sources.get(dotted)) from None
        except (ValueError, TypeError, OverflowError):
            raise ConfigError(dotted, f"expected {type_name(hint)}, got {value!r}", sources.get(dotted)) from None
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in kwargs]
    if missing:
        key = f"{prefix}{missing[0]}"
        where = prefix.rstrip(".")
        raise ConfigError(key, "is required", sources.get(where) or sources.get(where.rsplit("[", 1)[0]))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        key = f"{prefix}{e.key}"
        raise ConfigError(key, e.message, e.source or sources.get(key)) from None


YAML_NULLS = ("null", "Null", "NULL", "~")


def field_hint(key: str) -> Any:
    """The annotation of the dotted ``key`` in the schema, or None if it names no field."""
    cls, hint = Config, None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return None
        cls = hint
    return hint


def _takes_text(hint: Any) -> bool:
    """Whether a field of this annotation holds text: str, optional str, or a list of str."""
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    return any(o is str or (typing.get_origin(o) is list and typing.get_args(o) == (str,)) for o in options)


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, value). A field that holds text (a name, a path, a prompt)
    takes the text after ``=`` exactly as written, so ``run.name=007`` is "007", ``data.dir=0777``
    is not 511 and ``a #x`` is not cut at the '#'; a YAML null word (null, ~) still means null
    where the field allows it. Any other field reads the value as YAML (numbers, true/false,
    lists, data.mixture's mappings), and its type is checked when the config is built."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "an override is written key=value, e.g. optim.lr=3e-4", COMMAND_LINE)
    hint = field_hint(key)
    if hint is not None and _takes_text(hint):
        nullable = type(None) in typing.get_args(hint)
        return key, None if nullable and raw in YAML_NULLS else raw
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict, key: str, value: Any, sources: dict[str, str], source: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"'{part}' is not a section", source)
        node = child
    node[parts[-1]] = value
    sources[key] = source


def _record_sources(tree: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    for key, value in tree.items():
        sources[f"{prefix}{key}"] = source
        if isinstance(value, dict):
            _record_sources(value, source, sources, f"{prefix}{key}.")


def load_config(config: str | None, overrides: list[str] = ()) -> Config:
    """Load a preset or YAML file (or only defaults when None) and apply dotted overrides."""
    tree: dict = {}
    sources: dict[str, str] = {}
    preset = "custom"
    if config is not None:
        path = resolve_config_path(config)
        tree = read_yaml(path)
        _record_sources(tree, str(path), sources)
        preset = path.stem
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, sources, COMMAND_LINE)
    tree.setdefault("preset", preset)
    model = tree.get("model")
    if isinstance(model, dict) and model.get("init_from"):
        _import_architecture(model, sources, Path(str(model["init_from"])))
    return build(Config, tree, sources)


def _import_architecture(model: dict, sources: dict[str, str], directory: Path) -> None:
    """model.init_from's config.json sets the architecture keys of ``model`` (the model section of
    the tree being loaded). A key the user set in their own file or on the command line must
    agree with it; a preset's keys give way (a preset sizes a model from scratch, the import
    brings its own)."""
    imported = hugging_face.model_keys(hugging_face.read_config(directory), directory)
    hints = typing.get_type_hints(ModelConfig)
    origin = str(directory / hugging_face.CONFIG_FILE)
    for key, value in imported.items():
        dotted = f"model.{key}"
        source = sources.get(dotted)
        if key in model and not (source and Path(source).resolve().parent == CONFIGS_DIR):
            try:
                given = _coerce(model[key], hints[key])
            except (ValueError, TypeError):
                given = model[key]
            if given != value:
                raise ConfigError(
                    dotted,
                    f"is {model[key]!r} here but {origin} says {value!r}; remove {dotted} or set it to {value!r}",
                    source,
                )
        model[key] = value
        sources[dotted] = origin


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict, source: str) -> Config:
    """Rebuild a config written by :func:`to_yaml` (e.g. a run directory's config.yaml)."""
    sources: dict[str, str] = {}
    _record_sources(data, source, sources)
    return build(Config, data, sources)
