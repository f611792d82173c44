"""The layout shows the layers: every import in src/cltune (read with ast, lazy imports inside functions
included) goes to the same layer or a lower one, and docs/architecture.md names the same layers in the same order."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cltune"

# Lowest first; a module may import only from its own layer and those before it. The one place the order is written.
LAYERS = [
    ("core", ["cltune", "cltune.errors", "cltune.config"]),
    ("storage", ["cltune.storage"]),
    ("data", ["cltune.data"]),
    ("modeling", ["cltune.modeling"]),
    ("evaluation", ["cltune.evaluation"]),
    ("report", ["cltune.report"]),
    ("strategies", ["cltune.strategies"]),
    ("training", ["cltune.training"]),
    ("studies", ["cltune.studies"]),
    ("serving", ["cltune.serving"]),
    ("commands", ["cltune.api", "cltune.cli", "cltune.__main__"]),
]


def layer_of(module: str) -> int:
    """The layer of a dotted module name: the longest listed prefix wins (cltune.errors before cltune)."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer: add its package to LAYERS"
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every cltune import in the file: `from cltune.x import y` gives cltune.x, and
    `from cltune import y` gives cltune.y (a submodule) or cltune itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "cltune"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cltune":
            if node.module == "cltune":
                found += [(node.lineno, f"cltune.{a.name}" if (PACKAGE / a.name).exists()
                           or (PACKAGE / f"{a.name}.py").exists() else "cltune") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for line, target in imports(path):
            if layer_of(target) > layer_of(here):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {here} ({LAYERS[layer_of(here)][0]}) imports "
                                f"{target} ({LAYERS[layer_of(target)][0]}), a higher layer")
    return problems


def test_no_module_imports_a_higher_layer():
    assert not upward_imports()


def test_only_config_errors_api_and_cli_lie_at_the_top():
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert flat == {"__init__", "__main__", "api", "cli", "config", "errors"}
    for _, prefixes in LAYERS:  # every layer's package exists
        for prefix in prefixes:
            dotted = prefix.split(".")[1:]
            assert (PACKAGE.joinpath(*dotted)).is_dir() or PACKAGE.joinpath(*dotted[:-1], f"{dotted[-1]}.py").exists() \
                or prefix == "cltune", prefix


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """A data module importing the training loop is named, with its line."""
    fake = tmp_path / "src" / "cltune"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "x.py").write_text("import os\n\nfrom cltune.training.loop import train_phase\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert upward_imports() == ["src/cltune/data/x.py:3: cltune.data.x (data) imports cltune.training.loop "
                                "(training), a higher layer"]


def test_the_architecture_page_names_the_layers_in_order():
    """docs/architecture.md's layer table lists each layer's folder, lowest first, as LAYERS does."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text[text.index("<!-- layers:start -->"):text.index("<!-- layers:end -->")]
    named = re.findall(r"^\| \*\*(\w+)\*\* \|", table, flags=re.M)
    assert named == [name for name, _ in LAYERS]
    for name, prefixes in LAYERS[1:-1]:  # each package layer's folder is named in its row, and exists
        folder = prefixes[0].split(".", 1)[1]
        row = next(r for r in table.splitlines() if r.startswith(f"| **{name}** |"))
        assert f"`{folder}/`" in row and (PACKAGE / folder).is_dir(), row
