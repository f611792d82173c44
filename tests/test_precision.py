"""Training precision: `auto` follows the hardware, runs of different precisions share one process,
and the bf16 path trains close to fp32, stops on divergence (test_reliability.py) and saves fp32 weights.

bf16 runs on every CPU (emulated where it lacks AVX-512 BF16/AMX, which is slow but fine for a
tiny model), so these tests force it rather than depend on the machine they run on.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cltune import pipeline, session
from cltune.checkpoint import load_checkpoint
from cltune.evaluate import perplexity
from cltune.scoring import TokenScorer

XEON_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: sysret_ss_attrs avx512_bf16_is_not_a_flag\n"


def test_cpu_bf16_support_is_read_from_the_flags_line():
    assert session.cpu_supports_bf16(XEON_AMX)
    assert not session.cpu_supports_bf16(EPYC_AVX2)
    assert not session.cpu_supports_bf16("")


@pytest.mark.parametrize(("native_bf16", "setting", "mode"), [
    (True, "auto", "bf16"), (False, "auto", "no"), (True, "fp32", "no"), (False, "bf16", "bf16"), (True, "fp16", "fp16"),
])
def test_auto_precision_follows_the_cpu(monkeypatch, native_bf16, setting, mode):
    monkeypatch.setattr(session.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(session, "cpu_supports_bf16", lambda: native_bf16)
    assert session.mixed_precision(setting) == mode


def _log_losses(run_dir, phase: int) -> list[float]:
    lines = (run_dir / f"phase{phase}" / "train_log.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


@pytest.fixture(scope="module")
def three_runs(tiny_model_dir, tmp_path_factory):
    """fp32, then bf16, then fp32 again, in one process; `auto` resolved as on a CPU with and without bf16."""
    from conftest import tiny_run_config, write_dialogue

    from cltune.api import make_config

    folder = tmp_path_factory.mktemp("precision")
    csvs = [write_dialogue(folder / "guest_a.csv", "Guest A", 60, 1), write_dialogue(folder / "guest_b.csv", "Guest B", 40, 2)]
    runs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session.torch.cuda, "is_available", lambda: False)
        for name, setting, native in [("first", "auto", False), ("bf16", "auto", True), ("again", "fp32", True)]:
            patch.setattr(session, "cpu_supports_bf16", lambda native=native: native)
            raw = tiny_run_config(tiny_model_dir, csvs, folder / "runs", "ewc_replay", name=name)
            raw["model"]["precision"] = setting
            raw["train"]["epochs"] = 2
            config = make_config(raw)
            runs.append((config, pipeline.run(config)))
    return runs


def test_runs_of_different_precisions_share_one_process(three_runs):
    (fp32_config, fp32), (bf16_config, bf16), (_, again) = three_runs
    assert [m.precision for m in (fp32, bf16, again)] == ["fp32", "bf16", "fp32"]
    # The bf16 run left nothing behind: the next fp32 run is the first one, number for number.
    assert again.ppl == fp32.ppl and again.speaker_attribution == fp32.speaker_attribution
    assert _log_losses(fp32_config.run_dir, 2) == _log_losses(fp32_config.run_dir.with_name("again"), 2)
    # Evaluation is fp32 in every run: before training the matrices agree exactly.
    assert bf16.ppl[0] == fp32.ppl[0]


def test_bf16_training_tracks_fp32(three_runs):
    (fp32_config, fp32), (bf16_config, bf16), _ = three_runs
    for phase in (1, 2):
        fp32_losses, bf16_losses = _log_losses(fp32_config.run_dir, phase), _log_losses(bf16_config.run_dir, phase)
        assert len(bf16_losses) == len(fp32_losses) >= 4 and all(map(math.isfinite, bf16_losses))
        # bf16 matmuls ran (the losses differ) and track fp32's closely (seen: 3e-5 relative on this model).
        assert bf16_losses != fp32_losses
        assert bf16_losses == pytest.approx(fp32_losses, rel=1e-3)
    assert bf16.ppl[2] == pytest.approx(fp32.ppl[2], rel=1e-3)
    assert bf16.ppl[1][0] < bf16.ppl[0][0] and bf16.ppl[2][1] < bf16.ppl[0][1]


def test_a_bf16_checkpoint_loads_in_fp32_and_scores_as_recorded(three_runs):
    (_, _), (bf16_config, bf16), _ = three_runs
    model, tokenizer, _ = load_checkpoint(bf16_config.run_dir / "phase2")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _, tasks, _ = session.load_tasks(bf16_config)
    scorer = TokenScorer(model)
    reloaded = [perplexity(session.make_accelerator("fp32"), scorer, tokenizer, task.test, bf16_config.data.max_length)
                for task in tasks]
    assert reloaded == pytest.approx(bf16.ppl[2], rel=1e-5)
