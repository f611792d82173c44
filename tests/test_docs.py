"""The README and the docs site stay in sync with the code: commands and flags, make targets, the strategy list, the
example strategy, the fault table, the README's size, and a strict build of the site with its generated reference."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cltune.strategies import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]  # every page a user reads, the benchmark pages included
STRATEGIES_PAGE = DOCS / "howto" / "strategies.md"
TROUBLESHOOTING_PAGE = DOCS / "howto" / "troubleshooting.md"
README_LIMIT = 15_000  # bytes: the README is a door (what it does, set-up, a first run, links), the docs the house


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_readme_is_a_door_not_the_house():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; move detail into docs/ (limit {README_LIMIT:,})"


def test_the_readme_links_resolve():
    """The README is read on GitHub, outside the site's strict build: its relative links must name existing files."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _text(README))
    local = [t for t in targets if "://" not in t]
    missing = [t for t in local if not (ROOT / t).exists()]
    assert len(local) >= 10 and not missing, missing


def test_the_strategies_page_documents_every_registered_strategy():
    text = _text(STRATEGIES_PAGE)
    block = text[text.index("<!-- strategies:start -->"): text.index("<!-- strategies:end -->")]
    missing = [name for name in REGISTRY if f"**`{name}`**" not in block]
    assert not missing, f"{_name(STRATEGIES_PAGE)} lacks a paragraph for {missing}"


def test_the_readme_strategy_table_lists_every_registered_strategy():
    rows = re.findall(r"^\| `(\w+)`", _text(README), flags=re.M)
    assert sorted(rows) == sorted(REGISTRY), set(rows) ^ set(REGISTRY)


def _cltune_invocations(text: str) -> list[list[str]]:
    """The argument lists after `cltune` in a page's fenced bash blocks and inline `cltune …` spans."""
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

    group = get_command(app)
    commands = group.commands
    problems = []
    for args in _cltune_invocations(text):
        name = args[0] if args else ""
        if name.startswith("-"):  # an option of cltune itself, e.g. `cltune --help`
            known = {opt for param in group.params for opt in param.opts} | {"--help"}
            problems += [f"cltune {' '.join(args)}: cltune has no {name}"] if name not in known else []
            continue
        if name not in commands:
            problems.append(f"cltune {' '.join(args)}: no command {name!r}")
            continue
        flags = {opt for param in commands[name].params for opt in param.opts + param.secondary_opts} | {"--help"}
        problems += [f"cltune {' '.join(args)}: {name} has no {flag}"
                     for flag in (a.split("=")[0] for a in args[1:] if a.startswith("--")) if flag not in flags]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_commands_and_flags_on_every_page_exist_in_the_cli(page):
    problems = _unknown_commands_and_flags(_text(page))
    assert not problems, problems


def test_the_pages_show_commands_the_check_can_see():
    assert len(_cltune_invocations(_text(README))) >= 5
    assert sum(len(_cltune_invocations(_text(page))) for page in PAGES) >= 60


def test_the_command_check_catches_made_up_commands_and_flags():
    text = ("```bash\n.venv/bin/cltune run my.yaml --sett x=1  # a typo\ncltune trian --data a.csv\n"
            "accelerate launch --multi_gpu -m cltune sweep c.yaml --grid a=1,2\n```\nsee `cltune run x.yaml --resume`,"
            " `cltune run --help` and `cltune --hlep`")
    assert _unknown_commands_and_flags(text) == ["cltune run my.yaml --sett x=1: run has no --sett",
                                                 "cltune trian --data a.csv: no command 'trian'",
                                                 "cltune --hlep: cltune has no --hlep"]


def test_make_targets_on_every_page_exist():
    makefile = _text(ROOT / "Makefile")
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
    blocks = "".join(block for page in PAGES for block in re.findall(r"```bash\n(.*?)```", _text(page), flags=re.S))
    used = set(re.findall(r"^\s*make ([a-z-]+)", blocks, flags=re.M))
    assert {"demo", "test"} <= used and used <= targets, used - targets


def test_the_example_strategy_runs_end_to_end(tiny_config):
    """The "Writing a strategy" example, executed as written: registered, configured, trained, resumed state."""
    from cltune.api import make_config
    from cltune.studies.pipeline import run_stream
    from cltune.training.session import build_session

    text = _text(STRATEGIES_PAGE)
    block = text[text.index("## Writing a strategy"):]
    code = re.search(r"```python\n(.*?)```", block, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, f"{_name(STRATEGIES_PAGE)} (Writing a strategy)", "exec"), namespace)  # noqa: S102 - our own docs
    cls = namespace["STRATEGY"]
    REGISTRY.add(cls)
    try:
        base = tiny_config("naive")
        raw = base.model_dump(mode="json", by_alias=True) | {"strategy": "l2_anchor", "l2_anchor": {"strength": 1e4}}
        pinned = run_stream(make_config(raw, ["name=pinned", "eval.attribution=false", "eval.samples_per_speaker=0"]))
        raw["l2_anchor"]["strength"] = 0.0
        free = run_stream(make_config(raw, ["name=free", "eval.attribution=false", "eval.samples_per_speaker=0"]))
    finally:
        REGISTRY.remove(cls.name)
    # A strong pull keeps task 1 where phase 1 left it; without it phase 2 moves it.
    assert abs(pinned.ppl[2][0] - pinned.ppl[1][0]) < 0.2 * abs(free.ppl[2][0] - free.ppl[1][0])
    # what after_task returns is the phase's cost in metrics.json: every trained weight anchored
    anchored = sum(p.numel() for p in build_session(base).ctx.trainable().values())
    assert [p.strategy["anchored_parameters"] for p in pinned.phases] == [anchored, anchored]
    assert namespace["l2_penalty"]({"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([0.0, 1.0])}, 2.0).item() == 10.0


def _fault_table_tests() -> list[tuple[str, str]]:
    """(test file, test function) of every test the troubleshooting page's fault table names."""
    section = _text(TROUBLESHOOTING_PAGE).split("| fault | what cltune does | test |", 1)[1].split("\n\n", 1)[0]
    named = []
    for row in section.splitlines()[2:]:
        cells = row.split(" | ")
        assert len(cells) == 3 and "test_" in cells[2], row  # every fault names a test
        for name in re.findall(r"`((?:test_\w+\.py::)?test_\w+)(?:\[[^\]]*\])?`", cells[2]):
            file, _, function = name.rpartition("::")
            named.append((file or "test_faults.py", function))
    return named


def test_every_fault_in_the_table_names_a_test_that_exists():
    named = _fault_table_tests()
    assert len(named) >= 15
    tests = Path(__file__).resolve().parent
    missing = [f"{file}::{function}" for file, function in named
               if not re.search(rf"^def {function}\(", (tests / file).read_text(encoding="utf-8"), re.M)]
    assert not missing, missing


def _built_page(site: Path, page: str) -> str:
    """A built page's HTML, whichever URL style mkdocs.yml picks (page.html or page/index.html)."""
    path = site / f"{page}.html"
    return (path if path.exists() else site / page / "index.html").read_text(encoding="utf-8")


def _section(html: str, anchor: str) -> str:
    """The HTML from the heading with id `anchor` to the next heading of the same level."""
    start = html.index(f'id="{anchor}"')
    level = html.rfind("<h", 0, start)
    tag = html[level:level + 3]
    end = html.find(tag, start)
    return html[start:end if end != -1 else len(html)]


def test_the_docs_site_builds_strictly_with_the_reference_generated_from_the_code(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    from typer.main import get_command

    from cltune.cli import app

    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr  # strict: a broken link or anchor fails the build

    config = _built_page(site, "reference/config")
    assert "<code>lambda</code>" in _section(config, "ewc")  # the `ewc` section's key, from its settings model
    for section in REGISTRY.sections():
        assert f'id="{section}"' in config, section
    cli = _built_page(site, "reference/cli")
    assert "--resume" in _section(cli, "cltune-run")  # the `run` command's option, from the Typer app
    for name in get_command(app).commands:
        assert f'id="cltune-{name}"' in cli, name
    assert "-reference -->" not in config + cli  # every marker was replaced
