"""Config: unknown keys rejected, --set overrides, per-phase settings, resolved YAML."""

import pytest
import yaml

from cltune.api import make_config, read_config
from cltune.config import dump_config
from cltune.errors import UserError

BASE = {"tasks": [{"path": "a.csv"}, {"path": "b.csv"}]}


def test_the_resolved_yaml_rebuilds_the_same_config():
    """config.resolved.yaml is the run's whole config: aliases (`lambda`), tuples, paths and per-phase
    overrides survive the round trip."""
    c = make_config(BASE, ["phase2.lr=1e-3", "ewc.lambda=3", "data.split=[0.7, 0.2, 0.1]",
                           "lora.target_modules=[q_proj]"])
    again = make_config(yaml.safe_load(dump_config(c)))
    assert again == c and dump_config(again) == dump_config(c)


def test_set_overrides_phases_and_strategy_sections():
    c = make_config(BASE, ["phase2.epochs=3", "ewc.lambda=20", "train.lr=1e-3", "replay.ratio=0.2"])
    assert c.phase(0).epochs == 2 and c.phase(1).epochs == 3
    assert c.phase(1).lr == 1e-3 and c.ewc.lambda_ == 20 and c.replay.ratio == 0.2
    resolved = yaml.safe_load(dump_config(c))
    assert resolved["ewc"]["lambda"] == 20 and resolved["phases"][1]["epochs"] == 3


@pytest.mark.parametrize("raw,sets,message", [
    ({**BASE, "colour": "red"}, [], r"colour: unknown key; every key: `cltune config-reference`"),
    (BASE, ["ewc.lamda=3"], r"ewc.lamda: unknown key \(did you mean ewc.lambda\?\)"),
    (BASE, ["phase2.epoch=3"], r"phases.1.epoch: unknown key \(did you mean phases.1.epochs\?\)"),
    ({**BASE, "tasks": [{"path": "a.csv", "speker_col": "x"}]}, [], r"did you mean tasks.0.speaker_col\?"),
    ({**BASE, "trian": {}}, [], r"trian: unknown key \(did you mean train\?\)"),
    (BASE, ["strategy=magic"], "unknown 'magic'; choose one of"),
    (BASE, ["strategy=progresive"], r"unknown 'progresive' \(did you mean progressive\?\)"),
    (BASE, ["train.lr=-1"], "train.lr"),
    ({"tasks": []}, [], "tasks"),
    (BASE, ["novalue"], "expected KEY=VALUE"),
])
def test_bad_configs_are_one_line_user_errors(raw, sets, message):
    with pytest.raises(UserError, match=message) as err:
        make_config(raw, sets)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tasks:\n  - path: a.csv\n bad: [\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"run.yaml: line \d+: invalid YAML"):
        read_config(path)


def test_a_glob_task_is_one_task_per_matching_file_in_sorted_order(tmp_path):
    """`tasks: [{glob: PATTERN}]`, read against the config's folder: each matching file is a task named after it, in
    sorted order, with the entry's other settings; a pattern that matches nothing, or one that also names a path or
    a name, is a one-line error naming the config."""
    folder = tmp_path / "transcripts"
    folder.mkdir()
    for name in ("b_guest.csv", "a_guest.csv", "c_guest.csv", "notes.txt"):
        (folder / name).write_text("who,text\nHost,hi\nGuest,hello\n", encoding="utf-8")
    path = tmp_path / "run.yaml"
    path.write_text('tasks: [{glob: "transcripts/*.csv", speaker_col: who}, {path: transcripts/notes.txt}]\n',
                    encoding="utf-8")
    config = read_config(path)
    assert [t.path for t in config.tasks] == [folder / "a_guest.csv", folder / "b_guest.csv", folder / "c_guest.csv",
                                              folder / "notes.txt"]
    assert [t.speaker_col for t in config.tasks] == ["who", "who", "who", None]
    absolute = tmp_path / "absolute.yaml"
    absolute.write_text(yaml.safe_dump({"tasks": [{"glob": f"{folder}/[ab]_*.csv"}]}), encoding="utf-8")
    assert [t.path.name for t in read_config(absolute).tasks] == ["a_guest.csv", "b_guest.csv"]
    for entry, message in (('{glob: "nothing/*.csv"}', r"run.yaml: tasks: glob 'nothing/\*.csv' matches no file"),
                           ('{glob: "transcripts/*.csv", name: x}', r"run.yaml: a task with glob .* drop its name")):
        path.write_text(f"tasks: [{entry}]\n", encoding="utf-8")
        with pytest.raises(UserError, match=message) as err:
            read_config(path)
        assert "\n" not in str(err.value)
