"""The README stays in sync with the code: config reference and strategy list."""

from pathlib import Path

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
