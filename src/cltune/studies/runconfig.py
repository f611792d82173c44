"""Run configs validated against the registered strategies: one settings section per strategy, unknown keys
and unknown strategy names refused (`cltune.config` validates; this module supplies the catalog)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cltune.config import BaseRunConfig, build_config, load_config


def _catalog():
    from cltune.strategies import REGISTRY

    return REGISTRY.catalog()


def make_config(raw: dict, sets: Sequence[str] | None = (), *, source: str = "config",
                fixed: dict | None = None) -> BaseRunConfig:
    """A validated run config from a dict, `--set` overrides and `fixed` values, with every registered strategy."""
    return build_config(raw, list(sets or ()), source=source, catalog=_catalog(), fixed=fixed)


def read_config(path: Path | str, sets: Sequence[str] | None = (), *, fixed: dict | None = None) -> BaseRunConfig:
    """A validated run config from a YAML file (task paths relative to it), overrides and `fixed` values."""
    return load_config(path, list(sets or ()), catalog=_catalog(), fixed=fixed)
