"""Load `get_config(arg)` files the way ml_collections' config_flags does, without absl.

`--config=configs/mnist.py:colored` loads that file and calls `get_config("colored")`.
A path under `configs/` that does not exist relative to the working directory falls
back to the copy installed with the package (`cgn_jax.configs`), so the CLI works
from any directory. `--config.a.b=value` overrides are parsed with `ast.literal_eval`
and must keep the field's type.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    pass


def _load_module(path: str):
    p = Path(path)
    if p.is_file():
        spec = importlib.util.spec_from_file_location(f"_cgn_config_{p.stem}", p)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    parts = p.with_suffix("").parts
    if parts and parts[0] == "configs" and len(parts) == 2:
        try:
            return importlib.import_module(f"cgn_jax.configs.{parts[1]}")
        except ModuleNotFoundError:
            pass
    raise ConfigError(
        f"config file {path!r} not found; pass a path such as configs/mnist.py:colored "
        "(relative to the repository root) or an absolute path"
    )


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`spec` is `PATH[:ARG]`; overrides are `--config.x.y=value` strings."""
    path, _, arg = spec.partition(":")
    module = _load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg) function")
    config = module.get_config(arg) if arg else module.get_config()
    apply_overrides(config, overrides)
    return config


def _parse_value(text: str, current):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"expected true/false, got {text!r}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, (list, tuple)):  # one value for a sequence field: a sequence of one ("30000")
        return type(current)(value if isinstance(value, (list, tuple)) else (value,))
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"expected a {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"bad override {item!r}; use --config.field=value")
        key, _, text = item[len("--config."):].partition("=")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise ConfigError(f"unknown config field {key!r}")
            node = node[name]
        if leaf not in node:
            valid = ", ".join(sorted(node.keys()))
            raise ConfigError(f"unknown config field {key!r}; fields here: {valid}")
        try:
            value = _parse_value(text, node[leaf])
        except ConfigError as e:
            raise ConfigError(f"--config.{key}: {e}") from None
        with node.ignore_type():
            node[leaf] = value
