"""`cltune export`: merged Hugging Face folders and PEFT adapters that load without cltune and compute what the
checkpoint serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli

TEXTS = ["so tell me what do you think", "i really love pizza and music", "quantum fields energy"]


def _served_logits(phase: Path, token: str, task: int | None = None) -> torch.Tensor:
    """Logits of `<token> text` for TEXTS from the checkpoint, through its router (by task, or by speaker)."""
    from cltune.serving.chat import Talker

    talker = Talker(phase)
    weights = talker.router.oracle(task) if task is not None else talker.router.agnostic(token)
    with weights, torch.no_grad():
        return torch.stack([talker.model(input_ids=_ids(talker.tokenizer, token, t)).logits[0, :6] for t in TEXTS])


def _ids(tokenizer, token: str, text: str) -> torch.Tensor:
    ids = [tokenizer.convert_tokens_to_ids(token)] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:6] + [tokenizer.eos_token_id] * (6 - len(ids[:6]))])


def _plain_logits(folder: Path, token: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return torch.stack([model(input_ids=_ids(tokenizer, token, t)).logits[0, :6] for t in TEXTS])


@pytest.mark.parametrize("strategy", ["naive", "adapters", "progressive"])
def test_a_merged_export_loads_in_plain_transformers_with_the_checkpoint_logits(strategy_streams, strategy, tmp_path,
                                                                                monkeypatch, capsys):
    raw, _ = strategy_streams(strategy)
    phase = Path(raw["output_dir"]) / raw["name"] / "phase2"
    out = tmp_path / "export"
    result = run_cli(monkeypatch, capsys, "export", phase, "--out", out)
    assert result.code == 0, result.err
    if strategy == "naive":  # one model serves everything: one folder
        folders = {"<GUEST_A>": (out, None), "<GUEST_B>": (out, None)}
    else:  # per-task weights: one folder per dataset, each what that dataset's oracle row scored
        folders = {"<GUEST_A>": (out / "guest_a", 0), "<GUEST_B>": (out / "guest_b", 1)}
    for token, (folder, task) in folders.items():
        assert f"wrote {folder}" in result.out
        files = {p.name for p in folder.iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "cltune_export.json"} <= files
        assert all(p.stat().st_mode & 0o444 == 0o444 for p in [folder, *folder.iterdir()])  # readable by all
        assert not any(name.startswith("adapter") for name in files)
        torch.testing.assert_close(_plain_logits(folder, token), _served_logits(phase, token, task), atol=1e-4, rtol=0)
    note = json.loads((next(iter(folders.values()))[0] / "cltune_export.json").read_text())
    assert note["format"] == "merged" and note["speaker_tokens"]["Guest A"] == "<GUEST_A>"

    if strategy != "naive":  # --speaker: the weights the router gives that speaker; a shared one is refused
        alone = run_cli(monkeypatch, capsys, "export", phase, "--out", tmp_path / "guest_b", "--speaker", "Guest B")
        assert alone.code == 0, alone.err
        torch.testing.assert_close(_plain_logits(tmp_path / "guest_b", "<GUEST_B>"), _served_logits(phase, "<GUEST_B>"),
                                   atol=1e-4, rtol=0)
        shared = run_cli(monkeypatch, capsys, "export", phase, "--out", tmp_path / "host", "--speaker", "Host")
        route = json.loads((phase / "router.json").read_text())["routes"]["<HOST>"]
        if strategy == "adapters" or len(route) > 1:  # adapters: always the likelihood mixture of both
            assert len(route) == 2 and shared.code == 2 and "mixture of 2 datasets' weights" in shared.err
        else:  # progressive's validated route gave the host one column: it exports as any speaker does
            assert shared.code == 0, shared.err
            torch.testing.assert_close(_plain_logits(tmp_path / "host", "<HOST>"), _served_logits(phase, "<HOST>"),
                                       atol=1e-4, rtol=0)


def test_fusion_cannot_be_merged_and_a_foreign_folder_is_never_replaced(strategy_streams, tmp_path, monkeypatch,
                                                                        capsys):
    raw, _ = strategy_streams("fusion")
    phase = Path(raw["output_dir"]) / raw["name"] / "phase2"
    refused = run_cli(monkeypatch, capsys, "export", phase, "--out", tmp_path / "fusion")
    assert refused.code == 2 and "depend on the input" in refused.err and not (tmp_path / "fusion").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    raw, _ = strategy_streams("naive")
    kept = run_cli(monkeypatch, capsys, "export", Path(raw["output_dir"]) / raw["name"] / "phase2", "--out", mine)
    assert kept.code == 2 and "is not a cltune export" in kept.err and (mine / "notes.txt").read_text() == "keep me"


def test_an_adapter_export_loads_with_peft_on_the_resized_base(strategy_streams, tiny_model_dir, tmp_path, monkeypatch,
                                                               capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw, _ = strategy_streams("ewc_replay")
    phase = Path(raw["output_dir"]) / raw["name"] / "phase2"
    out = tmp_path / "adapter"
    result = run_cli(monkeypatch, capsys, "export", phase, "--out", out, "--adapter")
    assert result.code == 0, result.err
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        loaded = torch.stack([model(input_ids=_ids(tokenizer, "<GUEST_B>", t)).logits[0, :6] for t in TEXTS])
    torch.testing.assert_close(loaded, _served_logits(phase, "<GUEST_B>"), atol=1e-5, rtol=0)
    raw, _ = strategy_streams("progressive")
    mixed = run_cli(monkeypatch, capsys, "export", Path(raw["output_dir"]) / raw["name"] / "phase2", "--out",
                   tmp_path / "p", "--adapter")
    assert mixed.code == 2 and "not one PEFT adapter" in mixed.err


@pytest.mark.parametrize(("kind", "tolerance"), [("f16", 1e-3), ("q8_0", 2e-2)])  # measured 1.9e-4 and 4.7e-3
def test_a_gguf_export_loads_in_transformers_with_the_merged_logits(strategy_streams, tmp_path, monkeypatch, capsys,
                                                                    kind, tolerance):
    """transformers' GGUF reader loads the file (weights and tokenizer with the speaker tokens whole) and its
    logits match the merged folder's within the format's rounding, relative to the largest logit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw, _ = strategy_streams("naive")
    phase = Path(raw["output_dir"]) / raw["name"] / "phase2"
    result = run_cli(monkeypatch, capsys, "export", phase, "--out", tmp_path / "gguf", "--gguf", kind)
    assert result.code == 0, result.err
    name = f"model-{kind}.gguf"
    assert name in {p.name for p in (tmp_path / "gguf").iterdir()}
    merged = tmp_path / "merged"
    assert run_cli(monkeypatch, capsys, "export", phase, "--out", merged).code == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=name)
    reference = AutoTokenizer.from_pretrained(merged)
    for text in ["<GUEST_A> so tell me what do you think", "[PAD]<HOST> i love pizza</s>"]:
        assert (tokenizer(text, add_special_tokens=False)["input_ids"]
                == reference(text, add_special_tokens=False)["input_ids"])
    import gguf

    fields = gguf.GGUFReader(tmp_path / "gguf" / name).fields
    add_bos, bos = (fields[f"tokenizer.ggml.{key}"] for key in ("add_bos_token", "bos_token_id"))
    # llama.cpp begins every prompt with the start token, as training began every row
    assert bool(add_bos.parts[add_bos.data[0]][0]) and int(bos.parts[bos.data[0]][0]) == reference.bos_token_id
    assert json.loads((merged / "cltune_export.json").read_text())["prompt"].startswith("<s> ")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        loaded = torch.stack([model(input_ids=_ids(tokenizer, "<GUEST_B>", t)).logits[0, :6] for t in TEXTS])
    expected = _plain_logits(merged, "<GUEST_B>")
    error = ((loaded - expected).abs().max() / expected.abs().max()).item()
    assert 1e-6 < error < tolerance  # rounded (so really stored as `kind`), within that format's rounding
    bad = run_cli(monkeypatch, capsys, "export", phase, "--out", tmp_path / "x", "--gguf", "q4")
    assert bad.code == 2 and "unknown --gguf type 'q4'" in bad.err
