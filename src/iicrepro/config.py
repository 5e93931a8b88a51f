"""params.yaml -> validated settings.

The base settings in params.yaml are the paper's; `presets.<name>` overrides part of them. The merged
result is validated against `schemas/params.schema.yaml` (also used by the Snakefile), so a wrong key
or value stops with its dotted path and the allowed values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from iicrepro.errors import UserError

SCHEMA_PATH = Path(__file__).with_name("schemas") / "params.schema.yaml"
DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(UserError):
    """A params.yaml problem, phrased for the user (what is wrong, where, how to fix it)."""


class Settings(dict):
    """A nested dict that also allows attribute access: ``s.pretrain.nce.k``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def wrap(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return cls({k: cls.wrap(v) for k, v in value.items()})
        if isinstance(value, list):
            return [cls.wrap(v) for v in value]
        return value


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Return `base` updated recursively by `override` (lists and scalars are replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML)."""
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value


@cache
def _schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate(settings: Mapping) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(settings), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  {where}: {err.message}")
        raise ConfigError(
            "params.yaml is invalid after applying the preset:\n"
            + "\n".join(lines)
            + "\nFix the named keys in params.yaml (schema: src/iicrepro/schemas/params.schema.yaml)."
        )


def preset_overrides(presets: Mapping, name: str) -> dict:
    """A preset's overrides with those of the presets it `extends` merged in first."""
    chain: list[str] = []
    while name is not None:
        if name in chain:
            raise ConfigError(f"presets extend each other in a loop: {' -> '.join([*chain, name])}")
        if name not in presets:
            known = ", ".join(sorted(presets)) or "none"
            where = f" (extended by preset {chain[-1]!r})" if chain else ""
            raise ConfigError(f"unknown preset {name!r}{where}; params.yaml defines: {known}")
        chain.append(name)
        name = (presets[name] or {}).get("extends")
    merged: dict = {}
    for link in reversed(chain):
        own = {k: v for k, v in (presets[link] or {}).items() if k != "extends"}
        merged = deep_merge(merged, own)
    return merged


def resolve(
    raw: Mapping, preset: str | None = None, overrides: list[str] | None = None
) -> Settings:
    """Merge the selected preset into the base settings, apply overrides, validate."""
    name = preset or raw.get("preset", "paper")
    presets = raw.get("presets") or {}
    merged = deep_merge(raw, preset_overrides(presets, name))
    merged["preset"] = name
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        set_dotted(merged, key, value)
    validate(merged)
    return Settings.wrap(merged)


def load(
    path: str | Path = DEFAULT_PARAMS,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> Settings:
    """Read params.yaml, apply the preset, then ``key.path=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root or pass --params PATH")
    raw = yaml.safe_load(path.read_text()) or {}
    return resolve(raw, preset, overrides)
