"""The strategy registry: the CLI's choices and the config's strategy sections come from here.

Each module of this package declares its strategy with one line, `STRATEGY = TheClass`; the
registry reads those declarations (importing a module registers nothing by itself), checks that
names are unique and that two strategies reading one config section agree on its settings model.
Adding a strategy is one file here plus its paragraph in docs/howto/strategies.md. A strategy defined elsewhere (a
test, a plugin) joins with `REGISTRY.add(cls)` and leaves with `REGISTRY.remove(name)`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping

from pydantic import BaseModel

from cltune.config import Catalog
from cltune.strategies.base import (
    Composite,
    Context,
    Outputs,
    Router,
    StepInfo,
    Strategy,
)


class Registry(Mapping[str, type[Strategy]]):
    """Strategies by name, in the order they were added."""

    def __init__(self, classes: list[type[Strategy]] = ()):
        self._classes: dict[str, type[Strategy]] = {}
        for cls in classes:
            self.add(cls)

    def add(self, cls: type[Strategy]) -> type[Strategy]:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"{cls!r} is not a Strategy subclass")
        if not cls.name.isidentifier() or cls.name in self._classes:
            raise ValueError(f"strategy name {cls.name!r} is "
                             f"{'taken' if cls.name in self._classes else 'not an identifier'}")
        known = self.sections()
        for section, model in cls.sections.items():
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise TypeError(f"strategy {cls.name}: section {section!r} needs a pydantic settings model")
            if section in known and known[section] is not model:
                raise ValueError(f"strategy {cls.name}: section {section!r} is already {known[section].__name__}")
        self._classes[cls.name] = cls
        return cls

    def remove(self, name: str) -> None:
        del self._classes[name]

    def __getitem__(self, name: str) -> type[Strategy]:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def sections(self) -> dict[str, type[BaseModel]]:
        """Every config section a registered strategy reads, with its settings model."""
        return {k: v for cls in self._classes.values() for k, v in cls.sections.items()}

    def catalog(self) -> Catalog:
        """What config validation needs (`cltune.config` imports no strategy and no torch)."""
        return Catalog(tuple(self._classes), tuple(self.sections().items()))

    def load(self, module_name: str) -> None:
        """Import a plugin module (a config's `plugins`): it registers its strategy by declaring `STRATEGY = Cls`
        (added here unless it is already) or by calling `REGISTRY.add` itself. Importing runs its code, as
        installing a package does: name only modules you trust."""
        from cltune.errors import UserError

        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"plugins: cannot import {module_name!r} ({type(err).__name__}: {err}); install it or put "
                            "its folder on PYTHONPATH (on every Ray worker too)") from None
        declared = getattr(module, "STRATEGY", None)
        if declared is not None and self._classes.get(getattr(declared, "name", None)) is not declared:
            try:
                self.add(declared)
            except (TypeError, ValueError) as err:  # not a Strategy, a name taken, a section's model differs
                raise UserError(f"plugins: {module_name}: {err}") from None

    def create(self, name: str, ctx: Context, config) -> Strategy:
        cls = self._classes[name]
        return cls(ctx, {section: getattr(config, section) for section in cls.sections})


def discover() -> list[type[Strategy]]:
    """The `STRATEGY` declared by each module of this package, naive first, then by name."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        declared = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STRATEGY", None)
        if declared is not None:
            found.append(declared)
    return sorted(found, key=lambda cls: (cls.name != "naive", cls.name))


REGISTRY = Registry(discover())


def create_strategy(name: str, ctx: Context, config) -> Strategy:
    return REGISTRY.create(name, ctx, config)


__all__ = ["REGISTRY", "Composite", "Context", "Outputs", "Registry", "Router", "StepInfo", "Strategy",
           "create_strategy", "discover"]
