"""The router a checkpoint saved (router.json): `cltune generate` routes a speaker exactly as the
run's evaluation and samples did."""

from __future__ import annotations

import json
from pathlib import Path

from cltune.errors import UserError
from cltune.strategies.adapters import AdapterRouter
from cltune.strategies.base import Router
from cltune.strategies.fusion import FusionRouter
from cltune.strategies.merge import FixedAdapterRouter
from cltune.strategies.progressive import ProgressiveRouter

ROUTER_FILE = "router.json"
KINDS = {cls.kind: cls for cls in (AdapterRouter, FixedAdapterRouter, FusionRouter, ProgressiveRouter)}


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
