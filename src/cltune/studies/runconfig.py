"""Run configs validated against the registered strategies: one settings section per strategy, unknown keys
and unknown strategy names refused (`cltune.config` validates; this module supplies the catalog)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from cltune.config import BaseRunConfig, build_config, load_config, parse_overrides


def _catalog(raw: dict | None = None, sets: Sequence[str] | None = (), fixed: dict | None = None):
    """The registered strategies, after importing the plugins the config names (in the file, `--set`, `fixed`)."""
    from cltune.strategies import REGISTRY

    plugins = (raw or {}).get("plugins") or []
    for key, value in [*parse_overrides(list(sets or ())), *(fixed or {}).items()]:
        if key == "plugins":
            plugins = value
    for name in plugins if isinstance(plugins, list) else []:
        REGISTRY.load(str(name))
    return REGISTRY.catalog()


def make_config(raw: dict, sets: Sequence[str] | None = (), *, source: str = "config",
                fixed: dict | None = None) -> BaseRunConfig:
    """A validated run config from a dict, `--set` overrides and `fixed` values, with every registered strategy."""
    return build_config(raw, list(sets or ()), source=source, catalog=_catalog(raw, sets, fixed), fixed=fixed)


def read_config(path: Path | str, sets: Sequence[str] | None = (), *, fixed: dict | None = None) -> BaseRunConfig:
    """A validated run config from a YAML file (task paths relative to it), overrides and `fixed` values."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        raw = None  # load_config names what is wrong with the file
    return load_config(path, list(sets or ()), catalog=_catalog(raw if isinstance(raw, dict) else None, sets, fixed),
                       fixed=fixed)
