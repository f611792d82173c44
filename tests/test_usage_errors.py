"""Usage errors on the command line: random argv over every command (unknown commands and options, wrong
types, missing arguments and values) ends with Click's one-line message and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cltune.cli import OPTIONAL_VALUES


@functools.cache
def _commands() -> dict:
    from typer.main import get_command

    from cltune.cli import app

    return get_command(app).commands


def _is_number(param) -> bool:
    """An int or float parameter (Typer 0.29 describes types itself; Click's own parameters have `.type`)."""
    described = getattr(param, "type_descriptor", None)
    if described is not None:
        return described.annotation in (int, float)
    return getattr(param.type, "name", "") in ("integer", "float")


def _required_args(command) -> list[str]:
    """Placeholder values for the command's required arguments and options (parsing stops at the error first)."""
    args = []
    for param in command.params:
        if not param.required:
            continue
        value = "1" if _is_number(param) else "placeholder"
        args += [value] if param.param_type_name == "argument" else [param.opts[0], value]
    return args


def _options(command) -> list[str]:
    return [opt for param in command.params for opt in param.opts + param.secondary_opts]


_commands()  # imported once, outside the strategy: importing the libraries touches the global RNG


@st.composite
def bad_argv(draw) -> list[str]:
    """An argv with one certain usage error somewhere in it."""
    commands = _commands()
    name = draw(st.sampled_from(sorted(commands)))
    command = commands[name]
    kind = draw(st.sampled_from(["unknown command", "unknown option", "bad number", "missing value",
                                 "flag with a value", "missing argument"]))
    base = [name, *_required_args(command)]
    numbers = [p for p in command.params if p.param_type_name == "option" and _is_number(p)]
    flags = [p for p in command.params if p.param_type_name == "option" and p.is_flag]
    valued = [p for p in command.params if p.param_type_name == "option" and not p.is_flag
              and p.opts[0] not in OPTIONAL_VALUES]  # `--ray` alone is complete: it means a local Ray
    required = [p for p in command.params if p.required]
    if kind == "bad number" and numbers:
        param = draw(st.sampled_from(numbers))
        junk = draw(st.sampled_from(["abc", "1e", "", "one", "0x", "nan?", "--"]))
        return [*base, param.opts[0], junk] if junk != "--" else [*base, f"{param.opts[0]}=x1"]
    if kind == "missing value" and valued:
        return [*base, draw(st.sampled_from(valued)).opts[0]]  # an option that needs a value, at the end
    if kind == "flag with a value" and flags:
        return [*base, f"{draw(st.sampled_from(flags)).opts[0]}=maybe"]
    if kind == "missing argument" and required:
        return [name]
    if kind == "unknown command":
        word = draw(st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12))
        if word in commands or word.startswith("-"):
            word = f"x{word}"  # never a real command, never an option
        return [word, *draw(st.lists(st.sampled_from(["--out", "x", "--set", "a=1"]), max_size=3))]
    known = set(_options(command))
    option = "--" + draw(st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=14))
    if option in known or option == "--help":
        option += "zz"
    position = draw(st.integers(0, len(base)))
    return [*base[:position], option, *base[position:]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=bad_argv())
def test_random_usage_errors_exit_2_with_a_message_and_no_traceback(argv, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command could write lands in the repository
    result = cli(*argv)
    output = result.out + result.err
    assert result.code == 2, (argv, output)
    assert "Traceback" not in output, (argv, output)
    assert "Error:" in result.err and ("Usage: cltune" in result.err or "Try 'cltune" in result.err), (argv, output)
    assert not list(tmp_path.iterdir()), argv  # usage errors stop before any work


def test_every_kind_of_usage_error_reads_as_click_says_it(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        ("trian",): "No such command 'trian'. Did you mean 'train'?",
        ("run", "--outt", "x.yaml"): "No such option: --outt",
        ("eda", "a.csv", "--ot", "x"): "No such option: --ot (Possible options: --out)",
        ("run",): "Missing argument 'config'.",
        ("generate", "x", "--speaker", "A", "--max-new-tokens", "many"): "Invalid value for '--max-new-tokens'",
        ("generate", "x", "--speaker", "A", "--context-turns", "-1"): "Invalid value for '--context-turns'",
        ("compare", "c.yaml"): "Missing option '--strategies'",
        ("export", "x", "--out"): "Option '--out' requires an argument.",
    }
    for argv, message in cases.items():
        result = cli(*argv)
        assert result.code == 2 and message in " ".join(result.err.split()), (argv, result.err)
        assert "Traceback" not in result.out + result.err


def test_the_installed_script_prints_no_traceback_either(tmp_path):
    """The real process, not the in-process entry point: what a user's shell sees."""
    for argv in (["trian"], ["train", "--speaker-col"], ["run", "--outt", "x"]):
        proc = subprocess.run([sys.executable, "-m", "cltune", *argv], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr and "Error:" in proc.stderr, (argv, proc.stderr)


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["init", "--help"], ["strategies"]])
def test_help_and_listing_still_exit_0(argv, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(*argv)
    assert result.code == 0, result.err
    assert result.out.strip()
