"""The router a checkpoint saved (router.json): `cltune generate` routes a speaker exactly as the
run's evaluation and samples did."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from cltune.errors import UserError
from cltune.strategies.base import Router

ROUTER_FILE = "router.json"


def discover_routers() -> dict[str, type[Router]]:
    """The routers the strategy modules declare (`ROUTERS = (TheRouter, ...)`, beside `STRATEGY`), by kind,
    as the registry reads strategies; two routers of one kind are an error."""
    import cltune.strategies as package

    kinds: dict[str, type[Router]] = {}
    for module in pkgutil.iter_modules(package.__path__):
        if module.name == __name__.rpartition(".")[2]:
            continue
        for cls in getattr(importlib.import_module(f"{package.__name__}.{module.name}"), "ROUTERS", ()):
            if not (isinstance(cls, type) and issubclass(cls, Router)) or cls.kind == Router.kind:
                raise TypeError(f"{module.name}.ROUTERS: {cls!r} is not a Router subclass with a kind of its own")
            if kinds.get(cls.kind, cls) is not cls:
                raise ValueError(f"router kind {cls.kind!r} is declared by {kinds[cls.kind].__name__} and "
                                 f"{cls.__name__}")
            kinds[cls.kind] = cls
    return kinds


KINDS = discover_routers()


def load_router(folder: str | Path, model) -> Router:
    """The router saved in a checkpoint folder, bound to `model` (its adapters loaded from that folder).
    A checkpoint without router.json (written before routers were saved) is served by its active adapter."""
    path = Path(folder) / ROUTER_FILE
    if not path.exists():
        return Router()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kind = data["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a router description; restore the checkpoint folder") from None
    if kind == Router.kind:
        return Router()
    if not isinstance(kind, str) or kind not in KINDS:
        raise UserError(f"{path}: unknown router kind {kind!r}; this checkpoint needs a newer cltune")
    try:
        return KINDS[kind].from_json(data, model, folder)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: a {kind} router without its table; restore the checkpoint folder") from None
