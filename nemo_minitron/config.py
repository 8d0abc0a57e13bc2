"""Strict, typed job configs loaded from YAML with ``key=value`` overrides.

Every stage has one pydantic root class. Unknown keys, wrong types and failed checks become a
:class:`~nemo_minitron.errors.UserError` naming the offending key, so a bad config stops before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, ValidationError

from nemo_minitron.errors import UserError


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and no float is
    NaN or infinite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


C = TypeVar("C", bound=StrictModel)


def format_validation_error(err: ValidationError) -> str:
    """One line: ``key.path: message`` for the first problem (and how many more there are)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        if loc.rsplit(".", 1)[-1] == "_target_":
            # Hydra-style instantiation: no config here names code to run, so such a key is always a mistake.
            msg += " (configs never name a class or function to instantiate)"
    more = len(err.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict, values parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:  # YAML: e.g. a !!python tag, which safe loading refuses
        raise UserError(f"bad override: {str(exc).splitlines()[0]}") from None


def _paths(root: yaml.Node) -> dict[int, list[str]]:
    """``id(node)`` -> its keys and list indices from ``root``, for every node of the document."""
    paths: dict[int, list[str]] = {}
    stack: list[tuple[yaml.Node, list[str]]] = [(root, [])]
    while stack:
        node, parts = stack.pop()
        if id(node) in paths:  # an alias may point back at an ancestor
            continue
        paths[id(node)] = parts
        if isinstance(node, yaml.MappingNode):
            stack += [(value, parts + [str(key.value)]) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, parts + [str(i)]) for i, item in enumerate(node.value)]
    return paths


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading (no python tags) that refuses a key written twice in one mapping: PyYAML keeps the last
    value without a word, so the setting the user wrote first would silently not apply."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            # `<<: *base` followed by one of base's keys overrides it on purpose: merged keys are not checked.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = first_line.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first is not None:
                dotted = ".".join(_paths(self._root)[id(node)] + [str(key)])
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{dotted}' is written twice, on lines {first} and {line}", key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: Any, override: Any, where: str = "") -> Any:
    """``override`` laid over ``base``: mappings merge key by key, and a list takes index keys
    (``schedule.0.kd_tokens=...``); anything else is replaced."""
    if not isinstance(override, dict):
        return override
    if isinstance(base, list):
        merged_list = list(base)
        for key, value in override.items():
            if not str(key).isdigit() or int(key) >= len(base):
                raise UserError(f"override {where}{key}: {where.rstrip('.')} is a list of {len(base)} item(s), "
                                f"index it with 0..{len(base) - 1}")
            merged_list[int(key)] = _merge(base[int(key)], value, f"{where}{key}.")
        return merged_list
    if not isinstance(base, dict):
        return override
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value, f"{where}{key}.") if key in base else value
    return merged


def build_config(cls: type[C], data: dict, overrides: Sequence[str] = ()) -> C:
    """Merge ``overrides`` into ``data`` and validate it as ``cls``."""
    merged = _merge(data, parse_overrides(overrides))
    try:
        plain = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as exc:
        raise UserError(f"bad config: {str(exc).splitlines()[0]}") from None
    try:
        return cls.model_validate(plain)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None


def load_config(cls: type[C], path: str | Path | None, overrides: Sequence[str] = ()) -> C:
    """Load a YAML file (or nothing) plus ``key=value`` overrides into the strict config ``cls``."""
    return build_config(cls, load_yaml(path) if path is not None else {}, overrides)
