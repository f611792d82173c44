"""SI: path integral, importance and penalty against hand-computed values, the hook wiring, and a stream."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cltune.modeling.checkpoint import load_strategy_state
from cltune.strategies.base import Context
from cltune.strategies.si import SI, SISettings, consolidate, path_integral_step, si_penalty, si_penalty_grad
from cltune.studies import pipeline

from helpers import QUIET_EVAL


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_path_integral_step_adds_minus_gradient_times_motion():
    # Δθ = (−0.1, 0.2): ω = 0.5 − 2·(−0.1) = 0.7 and 0 − (−1)·0.2 = 0.2
    omega = path_integral_step({"w": t(0.5, 0.0)}, {"w": t(2.0, -1.0)}, {"w": t(1.0, 1.0)}, {"w": t(0.9, 1.2)})
    assert omega["w"].tolist() == pytest.approx([0.7, 0.2])


def test_consolidate_divides_by_squared_motion_plus_xi_and_drops_negative_credit():
    # Δθ² = (0.01, 0.04, 0), + ξ = 0.01 → (0.02, 0.05, 0.01); ω / that = (35, 4, −30 → 0)
    importance = consolidate({"w": t(1.0, 2.0, 0.5)}, {"w": t(0.7, 0.2, -0.3), "v": t(0.1)},
                             {"w": t(1.0, 1.0, 0.0), "v": t(0.0)}, {"w": t(0.9, 1.2, 0.0), "v": t(0.0)}, xi=0.01)
    assert importance["w"].tolist() == pytest.approx([36.0, 6.0, 0.5])
    assert importance["v"].tolist() == pytest.approx([10.0])  # a parameter without earlier importance starts at 0
    # importance of parameters the phase did not move is kept
    assert consolidate({"u": t(3.0)}, {}, {}, {}, xi=0.01)["u"].tolist() == [3.0]


def test_penalty_and_its_gradient():
    params = {"w": t(1.0, 2.0).requires_grad_()}
    anchor, importance = {"w": t(0.5, 2.5)}, {"w": t(4.0, 1.0)}
    penalty = si_penalty(params, anchor, importance, c=0.1)
    assert penalty.item() == pytest.approx(0.1 * (4 * 0.25 + 1 * 0.25))  # 0.125
    (autograd,) = torch.autograd.grad(penalty, [params["w"]])
    assert si_penalty_grad(params, anchor, importance, c=0.1)["w"].tolist() == pytest.approx([0.4, -0.1])
    assert autograd.tolist() == pytest.approx([0.4, -0.1])


def test_hooks_accumulate_the_task_gradient_and_consolidate():
    """Two phases of hand-made steps through the real hooks, on a one-weight model."""
    model = torch.nn.Linear(2, 1, bias=False).double()
    scale = 4.0  # as under fp16 loss scaling: the hooks must divide it out
    accelerator = SimpleNamespace(scaler=SimpleNamespace(get_scale=lambda: scale))
    ctx = Context(accelerator, model, None, None, [], 8, 0)
    si = SI(ctx, {"si": SISettings(c=0.1, xi=0.01)})
    w = model.weight

    def step(grad, new_value):
        w.grad = scale * t(grad).reshape(1, 2)
        si.after_backward(None)
        with torch.no_grad():
            w.copy_(t(new_value).reshape(1, 2))
        si.after_step(None)

    with torch.no_grad():
        w.copy_(t(1.0, 1.0).reshape(1, 2))
    si.before_task(SimpleNamespace(index=0, name="a"))
    step((2.0, -1.0), (0.9, 1.2))  # ω = −g·Δθ = (0.2, 0.2)
    si.after_task(None)
    # Ω = ω / (Δθ² + ξ) = (0.2 / 0.02, 0.2 / 0.05) = (10, 4); θ* = (0.9, 1.2)
    assert si.importance["weight"].flatten().tolist() == pytest.approx([10.0, 4.0])
    assert si.anchor["weight"].flatten().tolist() == pytest.approx([0.9, 1.2])
    assert si.step_penalty(None).item() == pytest.approx(0.0)

    si.before_task(SimpleNamespace(index=1, name="b"))
    step((1.0, 1.0), (1.0, 1.0))  # at θ*: no penalty gradient; ω = −(1, 1)·(0.1, −0.2) = (−0.1, 0.2)
    # penalty at (1, 1): 0.1 · (10·0.1² + 4·0.2²) = 0.026; its gradient 2c·Ω·(θ − θ*) = (0.2, −0.16)
    assert si.step_penalty(None).item() == pytest.approx(0.026)
    step((1.0 + 0.2, 1.0 - 0.16), (0.8, 1.1))  # task gradient (1, 1) + penalty gradient; Δθ = (−0.2, 0.1)
    # only the task gradient counts: ω = (−0.1, 0.2) − (1, 1)·(−0.2, 0.1) = (0.1, 0.1)
    # (counting the penalty's too would give (0.14, 0.116))
    assert si.omega["weight"].flatten().tolist() == pytest.approx([0.1, 0.1])
    si.after_task(None)
    # phase Δθ = (0.8, 1.1) − (0.9, 1.2) = (−0.1, −0.1): Ω = (10, 4) + 0.1 / 0.02 = (15, 9)
    assert si.importance["weight"].flatten().tolist() == pytest.approx([15.0, 9.0])

    restored = SI(ctx, {"si": SISettings()})
    restored.load_state(si.state())
    assert torch.equal(restored.importance["weight"], si.importance["weight"])
    assert torch.equal(restored.anchor["weight"], si.anchor["weight"])


def test_mid_phase_state_carries_the_running_path_integral():
    model = torch.nn.Linear(2, 1, bias=False)
    ctx = Context(SimpleNamespace(scaler=None), model, None, None, [], 8, 0)
    si = SI(ctx, {"si": SISettings()})
    si.before_task(SimpleNamespace(index=0, name="a"))
    model.weight.grad = torch.ones_like(model.weight)
    si.after_backward(None)
    with torch.no_grad():
        model.weight.sub_(0.5)
    si.after_step(None)
    resumed = SI(ctx, {"si": SISettings()})
    resumed.before_task(SimpleNamespace(index=0, name="a"))  # the pipeline calls it before restoring
    resumed.load_state(si.state())
    assert torch.allclose(resumed.omega["weight"], torch.full((1, 2), 0.5))
    assert torch.equal(resumed.start["weight"], si.start["weight"])


def test_penalty_holds_important_weights_in_phase2(tiny_config):
    def drift(c: float) -> tuple[float, list]:
        """Σ Ω₁ (θ₂ − θ₁)²: how far phase 2 moved the weights phase 1 found important."""
        config = tiny_config("si", eval=QUIET_EVAL, name=f"si-{c}", si={"c": c})
        ppl = pipeline.run_stream(config).ppl
        end1, end2 = load_strategy_state(config.run_dir / "phase1"), load_strategy_state(config.run_dir / "phase2")
        importance = {k[len("importance."):]: v for k, v in end1.items() if k.startswith("importance.")}
        assert importance and all(bool((v >= 0).all()) for v in importance.values())
        assert sum(v.sum().item() for v in importance.values()) > 0
        assert not any(k.startswith(("omega.", "start.")) for k in end2)  # spent at the phase's end
        return sum((v * (end2[f"anchor.{n}"] - end1[f"anchor.{n}"]) ** 2).sum().item()
                   for n, v in importance.items()), ppl

    free, free_ppl = drift(0.0)
    held, held_ppl = drift(10.0)
    assert held_ppl[1] == free_ppl[1]  # no penalty in phase 1
    assert free > 0 and held < 0.5 * free
