"""The explicit strategy registry: the CLI's choices and the config's sections come from here."""

from __future__ import annotations

from cltune.strategies.adapters import Adapters, AdaptersSettings
from cltune.strategies.agem import AGEM, AGEMSettings
from cltune.strategies.base import Composite, Context, Strategy
from cltune.strategies.ewc import EWC, EWCSettings
from cltune.strategies.ewc_replay import EWCReplay
from cltune.strategies.gen_replay import GenReplay, GenReplaySettings
from cltune.strategies.joint import Joint
from cltune.strategies.lwf import LwF, LwFSettings
from cltune.strategies.merge import Merge, MergeSettings
from cltune.strategies.naive import Naive
from cltune.strategies.olora import OLoRA, OLoRASettings
from cltune.strategies.replay import Replay, ReplaySettings
from cltune.strategies.reptile import Reptile, ReptileSettings
from cltune.strategies.si import SI, SISettings

# Settings models by config section name (e.g. `ewc: {lambda: 10}` in a run config).
SETTINGS = {
    "replay": ReplaySettings,
    "ewc": EWCSettings,
    "lwf": LwFSettings,
    "si": SISettings,
    "agem": AGEMSettings,
    "gen_replay": GenReplaySettings,
    "reptile": ReptileSettings,
    "adapters": AdaptersSettings,
    "merge": MergeSettings,
    "olora": OLoRASettings,
}

STRATEGIES: list[type[Strategy]] = [
    Naive,
    Replay,
    EWC,
    EWCReplay,
    LwF,
    SI,
    AGEM,
    Joint,
    GenReplay,
    Reptile,
    Adapters,
    Merge,
    OLoRA,
]

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in STRATEGIES}

for _cls in REGISTRY.values():
    if _missing := [s for s in _cls.sections if s not in SETTINGS]:
        raise RuntimeError(f"strategy {_cls.name} reads unregistered settings {_missing}")


def create_strategy(name: str, ctx: Context, config) -> Strategy:
    cls = REGISTRY[name]
    return cls(ctx, {section: getattr(config, section) for section in cls.sections})


__all__ = ["REGISTRY", "SETTINGS", "Composite", "Context", "Strategy", "create_strategy"]
