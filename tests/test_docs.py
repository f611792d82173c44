"""The README stays in sync with the code: config reference, strategy list, commands and flags, the example strategy."""

import re
from pathlib import Path

import torch

from cltune.reference import readme_with_reference
from cltune.strategies import REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_is_generated_from_the_models():
    text = README.read_text(encoding="utf-8")
    assert readme_with_reference(text) == text, "run `cltune config-reference --readme README.md`"


def test_readme_documents_every_registered_strategy():
    text = README.read_text(encoding="utf-8")
    block = text[text.index("<!-- strategies:start -->"): text.index("<!-- strategies:end -->")]
    missing = [name for name in REGISTRY if f"**`{name}`**" not in block]
    assert not missing, f"README lacks a paragraph for {missing}"


def _cltune_invocations(text: str) -> list[list[str]]:
    """The argument lists after `cltune` in the README's fenced bash blocks and inline `cltune …` spans."""
    import re
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    lines += re.findall(r"`((?:\.venv/bin/)?cltune [^`]+)`", text)
    out = []
    for line in lines:
        words = shlex.split(line, comments=True)
        starts = [i for i, w in enumerate(words) if w == "cltune" or w.endswith("/cltune")]
        if starts:
            out.append(words[starts[0] + 1:])
    return out


def _unknown_commands_and_flags(text: str) -> list[str]:
    from typer.main import get_command

    from cltune.cli import app

    commands = get_command(app).commands
    problems = []
    for args in _cltune_invocations(text):
        name = args[0] if args else ""
        if name not in commands:
            problems.append(f"cltune {' '.join(args)}: no command {name!r}")
            continue
        flags = {opt for param in commands[name].params for opt in param.opts + param.secondary_opts}
        problems += [f"cltune {' '.join(args)}: {name} has no {flag}"
                     for flag in (a.split("=")[0] for a in args[1:] if a.startswith("--")) if flag not in flags]
    return problems


def test_readme_commands_and_flags_exist_in_the_cli():
    text = README.read_text(encoding="utf-8")
    assert len(_cltune_invocations(text)) >= 8  # the parser finds the README's commands
    assert not _unknown_commands_and_flags(text)


def test_the_readme_check_catches_made_up_commands_and_flags():
    text = ("```bash\n.venv/bin/cltune run my.yaml --sett x=1  # a typo\ncltune trian --data a.csv\n"
            "accelerate launch --multi_gpu -m cltune sweep c.yaml --grid a=1,2\n```\nsee `cltune run x.yaml --resume`")
    assert _unknown_commands_and_flags(text) == ["cltune run my.yaml --sett x=1: run has no --sett",
                                                 "cltune trian --data a.csv: no command 'trian'"]


def test_readme_make_targets_exist():
    import re

    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
    blocks = "".join(re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S))
    used = set(re.findall(r"^make ([a-z-]+)", blocks, flags=re.M))
    assert used and used <= targets, used - targets


def test_the_readme_example_strategy_runs_end_to_end(tiny_config):
    """The "Writing a strategy" example, executed as written: registered, configured, trained, resumed state."""
    import re

    from cltune.api import make_config
    from cltune.pipeline import run

    text = README.read_text(encoding="utf-8")
    block = text[text.index("### Writing a strategy"):]
    code = re.search(r"```python\n(.*?)```", block, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Writing a strategy)", "exec"), namespace)  # noqa: S102 - our own README
    cls = namespace["STRATEGY"]
    REGISTRY.add(cls)
    try:
        base = tiny_config("naive")
        raw = base.model_dump(mode="json", by_alias=True) | {"strategy": "l2_anchor", "l2_anchor": {"strength": 1e4}}
        pinned = run(make_config(raw, ["name=pinned", "eval.attribution=false", "eval.samples_per_speaker=0"]))
        raw["l2_anchor"]["strength"] = 0.0
        free = run(make_config(raw, ["name=free", "eval.attribution=false", "eval.samples_per_speaker=0"]))
    finally:
        REGISTRY.remove(cls.name)
    # A strong pull keeps task 1 where phase 1 left it; without it phase 2 moves it.
    assert abs(pinned.ppl[2][0] - pinned.ppl[1][0]) < 0.2 * abs(free.ppl[2][0] - free.ppl[1][0])
    assert namespace["l2_penalty"]({"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([0.0, 1.0])}, 2.0).item() == 10.0


def _fault_table_tests() -> list[tuple[str, str]]:
    """(test file, test function) of every test the README's fault table names."""
    section = README.read_text(encoding="utf-8").split("| fault | what cltune does | test |", 1)[1].split("\n\n", 1)[0]
    named = []
    for row in section.splitlines()[2:]:
        cells = row.split(" | ")
        assert len(cells) == 3 and "test_" in cells[2], row  # every fault names a test
        for name in re.findall(r"`((?:test_\w+\.py::)?test_\w+)(?:\[[^\]]*\])?`", cells[2]):
            file, _, function = name.rpartition("::")
            named.append((file or "test_faults.py", function))
    return named


def test_every_fault_in_the_readme_table_names_a_test_that_exists():
    named = _fault_table_tests()
    assert len(named) >= 15
    tests = Path(__file__).resolve().parent
    missing = [f"{file}::{function}" for file, function in named
               if not re.search(rf"^def {function}\(", (tests / file).read_text(encoding="utf-8"), re.M)]
    assert not missing, missing
