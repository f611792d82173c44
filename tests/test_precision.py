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

from cltune.evaluation.evaluate import perplexity
from cltune.modeling.checkpoint import load_checkpoint
from cltune.modeling.scoring import TokenScorer
from cltune.studies import pipeline
from cltune.training import session

XEON_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: sysret_ss_attrs avx512_bf16_is_not_a_flag\n"


def test_cpu_bf16_support_is_read_from_the_flags_line():
    assert session.cpu_supports_bf16(XEON_AMX)
    assert not session.cpu_supports_bf16(EPYC_AVX2)
    assert not session.cpu_supports_bf16("")


@pytest.mark.parametrize(("native_bf16", "setting", "resolved"), [
    (True, "auto", "bf16"), (False, "auto", "fp32"), (True, "fp32", "fp32"), (False, "bf16", "bf16"),
    (True, "fp16", "fp16"),
])
def test_auto_precision_follows_the_cpu(monkeypatch, native_bf16, setting, resolved):
    monkeypatch.setattr(session.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(session, "cpu_supports_bf16", lambda: native_bf16)
    assert session.resolve_precision(setting) == resolved
    # Only fp16 is Accelerate autocast; bf16 is a bf16 base under fp32 adapters, with no autocast.
    assert session.make_accelerator(setting).mixed_precision == ("fp16" if resolved == "fp16" else "no")


def _log_losses(run_dir, phase: int) -> list[float]:
    lines = (run_dir / f"phase{phase}" / "train_log.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


@pytest.fixture(scope="module")
def three_runs(tiny_model_dir, tmp_path_factory):
    """fp32, then bf16, then fp32 again, in one process; `auto` resolved as on a CPU with and without bf16."""
    from cltune.api import make_config

    from helpers import tiny_run_config, write_dialogue

    folder = tmp_path_factory.mktemp("precision")
    csvs = [write_dialogue(folder / "guest_a.csv", "Guest A", 60, 1),
            write_dialogue(folder / "guest_b.csv", "Guest B", 40, 2)]
    runs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session.torch.cuda, "is_available", lambda: False)
        for name, setting, native in [("first", "auto", False), ("bf16", "auto", True), ("again", "fp32", True)]:
            patch.setattr(session, "cpu_supports_bf16", lambda native=native: native)
            raw = tiny_run_config(tiny_model_dir, csvs, folder / "runs", "ewc_replay", name=name)
            raw["model"]["precision"] = setting
            raw["train"]["epochs"] = 2
            config = make_config(raw)
            runs.append((config, pipeline.run_stream(config)))
    return runs


def test_runs_of_different_precisions_share_one_process(three_runs):
    (fp32_config, fp32), (bf16_config, bf16), (_, again) = three_runs
    assert [m.precision for m in (fp32, bf16, again)] == ["fp32", "bf16", "fp32"]
    # The bf16 run left nothing behind: the next fp32 run is the first one, number for number.
    assert again.ppl == fp32.ppl and again.speaker_attribution == fp32.speaker_attribution
    assert _log_losses(fp32_config.run_dir, 2) == _log_losses(fp32_config.run_dir.with_name("again"), 2)
    # Evaluation is fp32 arithmetic in both; before training the bf16 run's base differs only by its
    # rounding to bf16 (seen: 1e-5 relative on this model), so the figures are close, not identical.
    assert [m.eval_precision for m in (fp32, bf16, again)] == ["fp32", "fp32", "fp32"]
    assert bf16.ppl[0] != fp32.ppl[0]
    assert bf16.ppl[0] == pytest.approx(fp32.ppl[0], rel=5e-3)


def test_fp32_arithmetic_scores_the_stored_bf16_weights_in_fp32_and_puts_them_back(tiny_model_dir):
    """Evaluation of a bf16 run: the frozen base is upcast for the window (exactly what an fp32 scorer over
    the same bf16-rounded weights computes), bf16 arithmetic outside it differs, and the bf16 tensors come
    back bit for bit."""
    from cltune.data.split import Example
    from cltune.modeling.batching import collate, encode
    from cltune.modeling.model import settle_dtypes
    from cltune.modeling.scoring import target_nll

    from helpers import prepared

    model, tokenizer, _ = prepared(tiny_model_dir)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter something to add
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    texts = ["hello there, how are you", "fine thanks and you", "a longer sentence about the weather today"]
    encoded = encode([Example(0, "Host", "<HOST>", t, "test", i) for i, t in enumerate(texts)], tokenizer, 24)
    batch = collate(encoded, [0, 1, 2], tokenizer.pad_token_id)
    settle_dtypes(model, torch.bfloat16)
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = lambda: {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "lora" not in n}  # noqa: E731
    assert base() == {torch.bfloat16}
    scorer = TokenScorer(model, torch.bfloat16).eval()
    with torch.no_grad():
        low = target_nll(scorer(**batch.model_inputs()), batch.labels)
        with scorer.fp32_arithmetic():
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            with scorer.fp32_arithmetic():  # nested: one upcast, still fp32 after the inner window
                inner = target_nll(scorer(**batch.model_inputs()), batch.labels)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            outer = target_nll(scorer(**batch.model_inputs()), batch.labels)
        assert all(torch.equal(p, stored[n]) for n, p in model.named_parameters())
        settle_dtypes(model, torch.float32)  # the same rounded weights, scored by a plain fp32 scorer
        reference = target_nll(TokenScorer(model)(**batch.model_inputs()), batch.labels)
    assert torch.equal(inner, outer) and torch.allclose(outer, reference, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(low, reference, rtol=1e-6, atol=1e-6)  # bf16 arithmetic reads differently
    settle_dtypes(model, torch.bfloat16)
    run_precision = TokenScorer(model, torch.bfloat16, fp32_evaluation=False)
    with torch.no_grad(), run_precision.fp32_arithmetic():  # `eval.precision: run`: the window does nothing
        assert base() == {torch.bfloat16}
        assert torch.equal(target_nll(run_precision(**batch.model_inputs()), batch.labels), low)


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
    # The run evaluated with its base in bf16; the fp32 reload agrees within 0.5% (seen: 6e-5 on this model).
    assert reloaded == pytest.approx(bf16.ppl[2], rel=5e-3)


@pytest.mark.parametrize("strategy", ["adapters", "merge", "olora", "lwf", "ewc_replay", "fusion", "progressive"])
def test_a_bf16_run_keeps_the_base_in_bf16_and_every_adapter_in_fp32(tiny_model_dir, tmp_path, monkeypatch, strategy):
    """Strategies that add or merge adapters get them in the base's dtype from PEFT; the run settles them back."""
    from cltune.api import make_config
    from cltune.modeling.model import is_adapter_weight

    from helpers import tiny_run_config, write_dialogue

    csvs = [write_dialogue(tmp_path / "guest_a.csv", "Guest A", 40, 1),
            write_dialogue(tmp_path / "guest_b.csv", "Guest B", 40, 2)]
    raw = tiny_run_config(tiny_model_dir, csvs, tmp_path / "runs", strategy)
    raw["model"]["precision"] = "bf16"
    raw["eval"]["samples_per_speaker"] = 0
    built = []
    monkeypatch.setattr(pipeline, "build_session",
                        lambda config, **kw: built.append(session.build_session(config, **kw)) or built[-1])
    metrics = pipeline.run_stream(make_config(raw))
    assert metrics.precision == "bf16" and all(map(math.isfinite, metrics.ppl[-1]))
    dtypes: dict = {}
    for name, p in built[0].model.named_parameters():
        dtypes.setdefault("adapter" if is_adapter_weight(name) else "trained" if p.requires_grad else "base",
                          set()).add(p.dtype)
    assert dtypes["adapter"] == {torch.float32} and dtypes["base"] == {torch.bfloat16}
    assert dtypes.get("trained", {torch.float32}) == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_get_fp32_nll_and_gradients(monkeypatch, dtype):
    """bf16 logits are scored chunk by chunk in fp32: the values and gradients of cross-entropy on an fp32
    copy, with several chunks and a masked label."""
    from cltune.modeling.scoring import _ChunkedNLL, target_nll

    monkeypatch.setattr(_ChunkedNLL, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: 7 rows make 3 chunks
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (2, 5), generator=generator)
    labels[1, 4] = -100  # 8 positions after the first token, one masked: 7 targets
    logits = (4 * torch.randn(7, 50, generator=generator)).to(dtype).requires_grad_()
    weights = torch.rand(7, generator=generator)
    nll = target_nll(logits, labels)
    assert nll.dtype == torch.float32 and nll.shape == (7,)
    (nll * weights).sum().backward()
    reference = logits.detach().float().requires_grad_()
    want = torch.nn.functional.cross_entropy(reference, labels[:, 1:][labels[:, 1:] != -100], reduction="none")
    (want * weights).sum().backward()
    assert torch.allclose(nll, want, atol=1e-5)
    assert logits.grad.dtype == dtype
    assert torch.allclose(logits.grad.float(), reference.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-3)
    assert not torch.equal(logits.grad.float(), torch.zeros_like(reference.grad))
