"""Dataclass configs: YAML files + dotted ``key=value`` overrides, typed and documented.

A config is a (possibly nested) dataclass whose attributes carry docstrings — a string literal right
after the field, as in litgpt::

    @dataclass
    class OptimConfig:
        lr: float = 1e-4
        \"\"\"Peak learning rate.\"\"\"

``load_config(cls, "sft.yaml", ["optim.lr=3e-4"])`` builds ``cls`` from its defaults, then the YAML
file, then the overrides (in that order), coercing every value to the annotated type (int, float, bool,
str, Path, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Literal``, ``Enum``, nested
dataclasses). Every problem raises :class:`mmalign.errors.ConfigError` naming where the value came from
and the dotted key: ``sft.yaml:4: optim.lr: expected float, got 'abc'``.
``field_docs(cls)`` returns the attribute docstrings (for CLI help); ``dump_config`` writes YAML that
``load_config`` reads back to an equal object.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import itertools
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mmalign.atomic import atomic_write_text
from mmalign.errors import ConfigError

T = TypeVar("T")

_NONE_STRINGS = {"null", "none", "~", ""}
_TRUE_STRINGS = {"true", "yes", "on", "1"}
_FALSE_STRINGS = {"false", "no", "off", "0"}
OVERRIDE_ORIGIN = "override"


@dataclasses.dataclass(frozen=True)
class _Raw:
    """A leaf value before coercion, with the place it came from (``file:line`` or ``override``)."""

    value: Any
    origin: str
    from_string: bool = False
    """True for command-line overrides: the value is text to parse, not a YAML-typed value."""


class _CoercionError(Exception):
    """Internal: a value does not fit a type (message without location)."""


# ----------------------------------------------------------------------------------------------- loading
def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build config dataclass ``cls`` from its defaults, then ``yaml_path``, then ``overrides``.

    Overrides are ``dotted.key=value`` strings; ``value`` is parsed for the annotated type
    (``null``/``none`` for ``None``, ``true``/``false`` for bools, ``[1, 2]`` or ``1,2`` for lists).
    Raises ``ConfigError`` on unknown keys, missing required keys or values of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    tree: dict[str, Any] = {}
    if yaml_path is not None:
        tree = _read_yaml_tree(Path(yaml_path))
    for item in overrides:
        _apply_override(tree, item)
    return _build(cls, tree, prefix="", origin=str(yaml_path) if yaml_path else OVERRIDE_ORIGIN)


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """Split ``key=value`` strings into a dict (last one wins); ``ConfigError`` if one has no ``=``."""
    out: dict[str, str] = {}
    for item in overrides:
        key, value = _split_override(item)
        out[key] = value
    return out


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"{OVERRIDE_ORIGIN}: {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    return key, value.strip()


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, value = _split_override(item)
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):  # absent, or a leaf (e.g. `lora: null`) replaced by a section
            child = node[part] = {}
        node = child
        if not part:
            raise ConfigError(f"{OVERRIDE_ORIGIN}: {'.'.join(parts[: i + 1])}: empty key in {item!r}")
    node[parts[-1]] = _Raw(value, OVERRIDE_ORIGIN, from_string=True)


def _read_yaml_tree(path: Path) -> dict[str, Any]:
    """Read a YAML mapping into nested dicts whose leaves are ``_Raw`` values tagged ``file:line``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from err
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from err
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: the top level must be a mapping of keys")
    return _node_to_tree(node, path, prefix="")


def _node_to_tree(node: yaml.MappingNode, path: Path, prefix: str) -> dict[str, Any]:
    loader = yaml.SafeLoader("")
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = str(loader.construct_object(key_node, deep=True))
        dotted = f"{prefix}{key}"
        if key in out:
            raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: {dotted}: duplicate key")
        if isinstance(value_node, yaml.MappingNode):
            out[key] = _node_to_tree(value_node, path, prefix=f"{dotted}.")
        else:
            value = loader.construct_object(value_node, deep=True)
            out[key] = _Raw(value, f"{path}:{key_node.start_mark.line + 1}")
    return out


def _build(cls: type[T], tree: Mapping[str, Any], prefix: str, origin: str) -> T:
    """Instantiate dataclass ``cls`` from ``tree`` (missing keys keep their defaults)."""
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key, value in tree.items():
        if key not in fields:
            where = value.origin if isinstance(value, _Raw) else _first_origin(value, origin)
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: {prefix}{key}: unknown key (known keys: {known})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = f"{prefix}{name}"
        if name in tree:
            kwargs[name] = _coerce_node(tree[name], hints[name], dotted, origin)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{origin}: {dotted}: missing required key")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or cls.__name__}: {err}") from err


def _first_origin(tree: Any, default: str) -> str:
    if isinstance(tree, _Raw):
        return tree.origin
    if isinstance(tree, dict):
        for value in tree.values():
            return _first_origin(value, default)
    return default


def _coerce_node(node: Any, tp: Any, dotted: str, origin: str) -> Any:
    """Coerce a tree node (a ``_Raw`` leaf or a nested dict) to type ``tp``."""
    if isinstance(node, dict):
        section = _dataclass_in(tp)
        if section is not None:
            return _build(section, node, prefix=f"{dotted}.", origin=_first_origin(node, origin))
        if _origin(tp) is dict or tp is dict:
            return {
                k: _coerce_node(v, _args(tp)[1] if _args(tp) else Any, f"{dotted}.{k}", origin)
                for k, v in node.items()
            }
        raise ConfigError(
            f"{_first_origin(node, origin)}: {dotted}: expected {_type_name(tp)}, got a mapping"
        )
    assert isinstance(node, _Raw)
    try:
        return _coerce(node.value, tp, node.from_string)
    except _CoercionError as err:
        raise ConfigError(f"{node.origin}: {dotted}: {err}") from None


def _coerce(value: Any, tp: Any, from_string: bool) -> Any:
    """Coerce ``value`` to ``tp``; strings are parsed for non-string types (YAML reads ``1e-4`` as text)."""
    if tp is Any:
        return value
    origin, args = _origin(tp), _args(tp)
    if origin is Union:
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and from_string and value.lower() in _NONE_STRINGS):
            if len(non_none) < len(args):
                return None
            raise _CoercionError(f"expected {_type_name(tp)}, got None")
        for arg in non_none:
            try:
                return _coerce(value, arg, from_string)
            except _CoercionError:
                continue
        raise _CoercionError(f"expected {_type_name(tp)}, got {value!r}")
    if value is None:
        raise _CoercionError(f"expected {_type_name(tp)}, got None")
    if origin is Literal:
        for option in args:
            if value == option:
                return option
            if isinstance(option, bool | int | float) and isinstance(value, str):
                try:
                    if _coerce(value, type(option), True) == option:
                        return option
                except _CoercionError:
                    pass
        raise _CoercionError(f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        items = _as_sequence(value, tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise _CoercionError(f"expected {len(args)} items, got {len(items)}")
            return tuple(_coerce(v, a, from_string) for v, a in zip(items, args, strict=True))
        item_tp = args[0] if args else Any
        coerced = [_coerce(v, item_tp, from_string or isinstance(v, str)) for v in items]
        return tuple(coerced) if origin is tuple or tp is tuple else coerced
    if origin is dict or tp is dict:
        if isinstance(value, str) and from_string:
            value = _yaml_scalar(value)
        if not isinstance(value, dict):
            raise _CoercionError(f"expected a mapping, got {value!r}")
        val_tp = args[1] if args else Any
        return {str(k): _coerce(v, val_tp, False) for k, v in value.items()}
    if isinstance(tp, type):
        return _coerce_to_class(value, tp)
    raise _CoercionError(f"unsupported config type {_type_name(tp)}")


def _coerce_to_class(value: Any, tp: type) -> Any:
    if issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or str(value) == str(member.value):
                return member
        raise _CoercionError(f"expected one of {', '.join(repr(m.value) for m in tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
            return value.strip().lower() in _TRUE_STRINGS
        raise _CoercionError(f"expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = float("nan")
                if as_float.is_integer():
                    return int(as_float)
        raise _CoercionError(f"expected int, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _CoercionError(f"expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `model: 7` in YAML is a fine string
        raise _CoercionError(f"expected str, got {value!r}")
    if issubclass(tp, Path):
        if isinstance(value, str | os.PathLike):
            return Path(value)
        raise _CoercionError(f"expected a path, got {value!r}")
    if isinstance(value, tp):
        return value
    raise _CoercionError(f"expected {_type_name(tp)}, got {value!r}")


def _as_sequence(value: Any, tp: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = _yaml_scalar(text)
            if isinstance(parsed, list):
                return parsed
        return [] if not text else [part.strip() for part in text.split(",")]
    raise _CoercionError(f"expected {_type_name(tp)}, got {value!r}")


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise _CoercionError(f"cannot parse {text!r}: {err}") from None


# ----------------------------------------------------------------------------------------------- typing
def _origin(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    return Union if origin is types.UnionType else origin


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass ``tp`` is, or that ``tp = D | None`` holds; else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _origin(tp) is Union:
        for arg in _args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as err:  # an annotation names something not importable at module level
        raise TypeError(f"cannot resolve the annotations of {cls.__name__}: {err}") from err


def _type_name(tp: Any) -> str:
    if _origin(tp) is Union:
        return " | ".join(_type_name(a) for a in _args(tp))
    if _origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in _args(tp))
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not _args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def type_name(tp: Any) -> str:
    """Readable name of a config field type (``float``, ``int | None``, ``one of 'fp32', 'bf16'``)."""
    return _type_name(tp)


# ----------------------------------------------------------------------------------------------- dumping
def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-able dict of a config dataclass (enums → values, paths → str, tuples → lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically (temp file + ``os.replace``); returns the path."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    return atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------- docs
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of config dataclass ``cls``, read from its source.

    Keys are field names; fields of nested dataclass sections also appear as dotted keys
    (``optim.lr``). Fields without a docstring are absent. Base classes are included.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    if dataclasses.is_dataclass(cls):
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            section = _dataclass_in(hints.get(f.name))
            if section is not None and section is not cls:
                docs.update({f"{f.name}.{k}": v for k, v in field_docs(section).items()})
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined interactively: no source to read
        return {}
    class_def = ast.parse(source).body[0]
    if not isinstance(class_def, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    body = class_def.body
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One (possibly nested) config field, for help screens."""

    key: str
    """Dotted key, e.g. ``optim.lr``."""
    type: str
    """Readable type name."""
    default: Any
    """Default value (plain, as it would appear in YAML); ``MISSING`` fields have ``None``."""
    required: bool
    """True when the field has no default."""
    doc: str
    """The attribute docstring ('' when none)."""


def describe_config(cls: type) -> list[FieldInfo]:
    """Every leaf field of config dataclass ``cls``, nested sections flattened to dotted keys; an optional
    section (``LoraSpec | None``) is listed itself and then its fields."""
    docs = field_docs(cls)
    out: list[FieldInfo] = []

    def walk(klass: type, prefix: str) -> None:
        hints = _type_hints(klass)
        for f in dataclasses.fields(klass):  # type: ignore[arg-type]
            key = f"{prefix}{f.name}"
            section = _dataclass_in(hints[f.name])
            optional_section = section is not None and _origin(hints[f.name]) is Union
            if section is None or optional_section:  # a leaf, or `section | None` (settable to null)
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                if f.default is not dataclasses.MISSING:
                    default = _plain(f.default)
                elif f.default_factory is not dataclasses.MISSING:
                    default = _plain(f.default_factory())
                else:
                    default = None
                out.append(FieldInfo(key, _type_name(hints[f.name]), default, required, docs.get(key, "")))
            if section is not None:
                walk(section, f"{key}.")

    walk(cls, "")
    return out
