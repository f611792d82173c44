"""The seams of the design: config validation without torch, the registry, the strategy protocol
(hooks called as documented, Composite combining every member), extra strategy modules saved and
restored, and the typed metrics file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import Field

from cltune.api import make_config
from cltune.config import Strict
from cltune.errors import UserError
from cltune.evaluation.results import RunMetrics
from cltune.strategies import REGISTRY, Composite, Registry, Strategy
from cltune.strategies.ewc import EWC
from cltune.strategies.replay import Replay, ReplaySettings
from cltune.studies.pipeline import run_stream

from helpers import PPL_ONLY, tiny_run_config


def test_validating_a_config_imports_no_torch():
    code = ("import sys, cltune.config, cltune.errors; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_registry_finds_every_strategy_file_and_checks_names_and_sections():
    assert REGISTRY["ewc_replay"].sections == {"ewc": REGISTRY["ewc"].sections["ewc"], "replay": ReplaySettings}
    package = Path(__file__).resolve().parents[1] / "src" / "cltune" / "strategies"
    files = {p.stem for p in package.glob("*.py") if "\nSTRATEGY = " in p.read_text(encoding="utf-8")}
    assert set(REGISTRY.catalog().names) == set(REGISTRY) == files and {"naive", "ewc_replay", "progressive"} <= files
    registry = Registry([Replay])
    with pytest.raises(ValueError, match="taken"):
        registry.add(Replay)

    class OtherReplaySettings(Strict):
        ratio: float = 0.5

    class Clash(Strategy):
        name = "clash"
        sections: ClassVar = {"replay": OtherReplaySettings}

    with pytest.raises(ValueError, match="section 'replay' is already ReplaySettings"):
        registry.add(Clash)
    with pytest.raises(TypeError):
        registry.add(object)


# --- a strategy written in a test file, registered from here, with a module of its own --------------


class GateSettings(Strict):
    target: float = Field(2.0, description="value the gate learns towards")


class LearnedGate(Strategy):
    """A toy strategy: a one-number module trained by the phase's optimizer through batch_loss, plus
    counters that check the protocol's call pattern."""

    name = "learned_gate"
    summary = "test-only: a learned scalar"
    sections: ClassVar = {"gate": GateSettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.gate = torch.nn.Linear(1, 1, bias=False).to(ctx.accelerator.device)
        torch.nn.init.zeros_(self.gate.weight)
        self.calls = {"train_data": 0, "step_penalty": 0, "batch_loss": 0, "after_step": 0}
        self.steps_seen: list[tuple[int, int]] = []

    def train_data(self, task):
        self.calls["train_data"] += 1
        return task.train

    def batch_loss(self, batch, outputs, step):
        self.calls["batch_loss"] += 1
        return (self.gate.weight.sum() - self.settings["gate"].target) ** 2

    def step_penalty(self, step):
        self.calls["step_penalty"] += 1
        return None

    def after_step(self, step):
        self.calls["after_step"] += 1
        self.steps_seen.append((step.phase, step.step))

    def modules(self):
        return {"gate": self.gate}


@pytest.fixture()
def learned_gate():
    REGISTRY.add(LearnedGate)
    yield LearnedGate
    REGISTRY.remove(LearnedGate.name)


def test_a_strategy_from_a_test_file_runs_end_to_end_and_keeps_its_module(tiny_model_dir, two_tasks, tmp_path,
                                                                         learned_gate, captured):
    raw = tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "learned_gate", gate={"target": 2.0})
    config = make_config(raw, ["train.lr=5e-2", *PPL_ONLY])
    metrics = run_stream(config)
    strategy = captured[-1]
    steps = [p.steps for p in metrics.phases]
    # train_data once per phase; step_penalty and after_step once per optimizer step; batch_loss per micro-batch
    assert strategy.calls["train_data"] == 2
    assert strategy.calls["step_penalty"] == strategy.calls["after_step"] == sum(steps)
    assert strategy.calls["batch_loss"] == 2 * sum(steps)  # batch 8 in micro-batches of 4
    assert strategy.steps_seen == [(0, s) for s in range(1, steps[0] + 1)] + [(1, s) for s in range(1, steps[1] + 1)]
    learned = strategy.gate.weight.item()
    assert 0.1 < learned < 2  # the phase's optimizer moved it towards 2 (Adam: about lr per step)

    from safetensors.torch import load_file

    saved = load_file(str(config.run_dir / "phase2" / "strategy_state.safetensors"))
    assert saved["module.gate.weight"].item() == pytest.approx(learned)
    # a resumed run restores the module from the phase-1 checkpoint
    fresh = learned_gate(strategy.ctx, strategy.settings)
    fresh.load_full_state(load_file(str(config.run_dir / "phase1" / "strategy_state.safetensors")))
    assert 0 < fresh.gate.weight.item() < learned


def test_composite_combines_every_members_data_losses_and_costs(tiny_config):
    from cltune.training.session import build_session

    class Doubled(Strategy):  # adds a copy of the first two training utterances and a constant penalty
        name = "doubled"
        sections: ClassVar = {}

        def train_data(self, task):
            return task.train + task.train[:2]

        def step_penalty(self, step):
            return torch.tensor(3.0)

        def after_task(self, task):
            return {"doubled": 1}

    class ReplayEWCDoubled(Composite):
        name = "replay_ewc_doubled"
        parts = (Replay, EWC, Doubled)

    assert ReplayEWCDoubled.sections == {"replay": ReplaySettings, "ewc": EWC.sections["ewc"]}
    session = build_session(tiny_config("ewc_replay"))
    composite = ReplayEWCDoubled(session.ctx, {"replay": ReplaySettings(), "ewc": session.config.ewc})
    first, second = session.tasks
    costs = composite.after_task(first)
    data = composite.train_data(second)
    replayed = composite.members[0].buffer.examples()
    assert replayed and data == second.train + replayed  # Doubled's extra utterances are task 2's own: once
    ewc_penalty = composite.members[1].step_penalty(None)
    assert composite.step_penalty(None).item() == pytest.approx(ewc_penalty.item() + 3.0)
    assert costs == {"stored_utterances": len(replayed), "doubled": 1}  # every member's costs, merged


def test_run_metrics_read_old_files_and_refuse_damaged_ones(tiny_config, tmp_path):
    metrics = run_stream(tiny_config("naive", PPL_ONLY))
    path = tmp_path / "metrics.json"
    version1 = {k: v for k, v in metrics.to_json().items() if k != "schema_version"}
    path.write_text(json.dumps(version1))
    assert RunMetrics.read(path) == metrics
    for text, message in [("{", "not readable JSON"), ('{"schema_version": 9}', "schema version 9"),
                          (json.dumps({**version1, "ppl": "high"}), "ppl: Input should be a valid list")]:
        path.write_text(text)
        with pytest.raises(UserError, match=message) as err:
            RunMetrics.read(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_every_router_a_strategy_module_defines_is_registered_by_its_kind():
    """A saved router.json names its kind; `cltune generate` finds the class through the modules' ROUTERS."""
    import importlib
    import inspect
    import pkgutil

    import cltune.strategies as package
    from cltune.strategies.base import Router
    from cltune.strategies.routing import KINDS

    defined = {cls for module in pkgutil.iter_modules(package.__path__)
               for _, cls in inspect.getmembers(importlib.import_module(f"cltune.strategies.{module.name}"),
                                                inspect.isclass)
               if issubclass(cls, Router) and cls.kind != Router.kind
               and cls.__module__.startswith("cltune.strategies")}
    assert defined and set(KINDS.values()) == defined
    assert all(KINDS[cls.kind] is cls for cls in defined)
