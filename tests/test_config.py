"""Config: unknown keys rejected, --set overrides, per-phase settings, resolved YAML."""

import pytest
import yaml

from cltune.config import build_config, dump_config, load_config
from cltune.errors import UserError

BASE = {"tasks": [{"path": "a.csv"}, {"path": "b.csv"}]}


def test_defaults_follow_the_seed():
    c = build_config(BASE)
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 32, 0.05)
    assert (c.train.lr, c.train.batch_size, c.train.warmup_ratio, c.data.max_length) == (2e-4, 32, 0.1, 100)
    assert c.strategy == "ewc_replay" and c.ewc.lambda_ == 10 and c.replay.ratio == 0.1


def test_set_overrides_phases_and_strategy_sections():
    c = build_config(BASE, ["phase2.epochs=3", "ewc.lambda=20", "train.lr=1e-3", "replay.ratio=0.2"])
    assert c.phase(0).epochs == 2 and c.phase(1).epochs == 3
    assert c.phase(1).lr == 1e-3 and c.ewc.lambda_ == 20 and c.replay.ratio == 0.2
    resolved = yaml.safe_load(dump_config(c))
    assert resolved["ewc"]["lambda"] == 20 and resolved["phases"][1]["epochs"] == 3


@pytest.mark.parametrize("raw,sets,message", [
    ({**BASE, "colour": "red"}, [], "colour: Extra inputs are not permitted"),
    (BASE, ["ewc.lamda=3"], "ewc.lamda: Extra inputs are not permitted"),
    (BASE, ["strategy=magic"], "unknown 'magic'"),
    (BASE, ["train.lr=-1"], "train.lr"),
    ({"tasks": []}, [], "tasks"),
    (BASE, ["novalue"], "expected KEY=VALUE"),
])
def test_bad_configs_are_one_line_user_errors(raw, sets, message):
    with pytest.raises(UserError, match=message) as err:
        build_config(raw, sets)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tasks:\n  - path: a.csv\n bad: [\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"run.yaml: line \d+: invalid YAML"):
        load_config(path)
