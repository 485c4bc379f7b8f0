"""TOML in, a validated `ExperimentConfig` out: the file, then `--set key=value` overrides,
each table built into its dataclass (fedtune.config.schema) with unknown keys and wrong types
refused by name, then `validate()`."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from fedtune.config.checks import require_finite
from fedtune.config.errors import ConfigError
from fedtune.config.registry import method_names, method_spec
from fedtune.config.schema import MOVED_TUNING_KEYS, ExperimentConfig, TuningConfig


def load_config(path: str | Path | None = None, overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Read a TOML file (or the defaults when `path` is None), apply `key=value` overrides,
    and validate."""
    raw: dict[str, Any] = {} if path is None else read_toml(path, "config file")
    if path is not None:
        # The config's own data and model paths are the config file's folder's, wherever
        # it is run from; a path given with --set is the current folder's (as the shell
        # completes it).
        _resolve_local_paths(raw, Path(path).resolve().parent)
    for item in overrides or []:
        key, value = parse_override(item)
        over: dict[str, Any] = {}
        _set_dotted(over, key, value)
        _resolve_local_paths(over, Path.cwd())
        _set_dotted(raw, key, _get_dotted(over, key))
    return config_from_dict(raw)


def _get_dotted(raw: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


def _resolve_local_paths(raw: dict[str, Any], base: Path) -> None:
    """Make `raw`'s local paths absolute against `base`, so that the run's config.toml
    names the same files from any folder: in `data.options` every relative `data_files` name
    (a path or a glob; not a URL), and `path` when it names a file or folder in `base`
    (otherwise it is a builder such as "csv" or a hub dataset name); `model.backbone` when
    it names a file or folder in `base` (otherwise it is a bundled name or a hub id)."""
    model = raw.get("model")
    backbone = model.get("backbone") if isinstance(model, dict) else None
    if _is_local(backbone, base):
        model["backbone"] = str(base / backbone)
    data = raw.get("data")
    options = data.get("options") if isinstance(data, dict) else None
    if not isinstance(options, dict):
        return
    if "data_files" in options:
        options["data_files"] = _resolve_files(options["data_files"], base)
    if _is_local(options.get("path"), base):
        options["path"] = str(base / options["path"])


def _is_local(value: Any, base: Path) -> bool:
    """`value` is a relative path naming something in `base`."""
    return (isinstance(value, str) and bool(value)
            and not Path(value).expanduser().is_absolute() and (base / value).exists())


def _resolve_files(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        if "://" in value or Path(value).expanduser().is_absolute():
            return value
        return str(base / value)
    if isinstance(value, list):
        return [_resolve_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_files(v, base) for k, v in value.items()}
    return value  # a wrong type is refused by the corpus with its own message


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def config_from_toml(text: str) -> ExperimentConfig:
    try:
        return config_from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, raw, prefix="")
    cfg.validate()
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3). The value is read as a TOML value, else taken as a string,
    so `--set tuning.method=lora` needs no quotes."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.rounds=3")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        # repr() for a key no terminal shows as written (a newline would split the line).
        keys = ", ".join(prefix + k if k.isprintable() else repr(prefix + k) for k in unknown)
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {keys} in {where}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _build_tuning(raw: Any) -> TuningConfig:
    """`[tuning]`: its shared fields, then one `[tuning.<method>]` table per method given.
    An old flat key (`lora_r`) is refused with the key that replaced it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"tuning must be a table, got {type(raw).__name__}")
    for key in raw:
        if key in MOVED_TUNING_KEYS:
            table, name = MOVED_TUNING_KEYS[key]
            raise ConfigError(f"tuning.{key} moved: use [tuning.{table}] {name} "
                              f"(tuning.{table}.{name})")
    shared = {f.name for f in dataclasses.fields(TuningConfig)} - {"methods"}
    tables = {k: v for k, v in raw.items() if k not in shared}
    names = method_names()
    unknown = sorted(set(tables) - set(names))
    if unknown:
        keys = ", ".join("tuning." + k if k.isprintable() else repr("tuning." + k)
                         for k in unknown)
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {keys} in tuning; "
                          f"allowed: {', '.join(sorted(shared))} and the method tables "
                          f"{', '.join(names)}")
    cfg = _build(TuningConfig, {k: v for k, v in raw.items() if k in shared}, "tuning.")
    for name, table in tables.items():
        cfg.methods[name] = _build(method_spec(name).config, table, f"tuning.{name}.")
    return cfg


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if hint is TuningConfig:
        return _build_tuning(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (dict,) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        _check_finite_tree(value, key)
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(hint), value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        require_finite(key, value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has unsupported type {hint!r}")


def _coerce_union(members: tuple[Any, ...], value: Any, key: str) -> Any:
    """A field that takes one of several shapes (`list[int] | str`): the member whose
    base type the TOML value has decides; a value of none of them is refused."""
    for member in members:
        if isinstance(value, typing.get_origin(member) or member):
            return _coerce(member, value, key)
    names = {list: "a list", str: "a string", int: "an integer", float: "a number"}
    shapes = " or ".join(names.get(typing.get_origin(m) or m, repr(m)) for m in members)
    raise ConfigError(f"{key} must be {shapes}, got {value!r}")


def _check_finite_tree(value: Any, key: str) -> None:
    """Free-form tables (data.options, plugin parameters) get the same rule for every
    number they hold, however deeply nested."""
    if isinstance(value, float):
        require_finite(key, value)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_finite_tree(item, f"{key}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite_tree(item, f"{key}[{i}]")
