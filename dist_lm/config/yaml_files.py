"""Config files as YAML: read with a safe loader that refuses a key given twice, keeps the text of
a number given to a field typed str, and reads dates as text. Every error names the file (and the
line) in one line."""

from __future__ import annotations

from pathlib import Path

import yaml

from dist_lm.config.errors import ConfigError


class _TextInt(int):
    """An int read from YAML that keeps the text it was written as: a field typed str takes the
    text (``name: 007`` is "007", not "7"; ``dir: 0777`` is not 511)."""

    text: str


class _TextFloat(float):
    """A float read from YAML that keeps its text, as :class:`_TextInt`."""

    text: str


def _with_text(number_type: type, construct):
    def constructor(loader: yaml.SafeLoader, node: yaml.ScalarNode):
        value = number_type(construct(loader, node))
        value.text = node.value
        return value

    return constructor


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently),
    keeps the text of numbers (for fields typed str) and reads dates as text (no field is a date)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(str(key), f"given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _with_text(_TextInt, yaml.SafeLoader.construct_yaml_int))
_UniqueKeyLoader.add_constructor(
    "tag:yaml.org,2002:float", _with_text(_TextFloat, yaml.SafeLoader.construct_yaml_float)
)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        e.source = str(path)
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("(yaml)", f"not valid YAML{where}: {getattr(e, 'problem', e)}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("(top level)", "must be a mapping of config sections", str(path))
    return data
