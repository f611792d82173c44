"""LoRA parameter counts, trainable new-token rows, perplexity on a hand-checkable case, packing
equivalence, and checkpoint round-trips — all on models built from a config."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cltune.config import LoraSettings, ModelSettings
from cltune.data.split import Example, Split
from cltune.errors import UserError
from cltune.evaluation.evaluate import example_nll, perplexity, score_split
from cltune.modeling.batching import collate, encode
from cltune.modeling.checkpoint import load_checkpoint, save_checkpoint, verify
from cltune.modeling.model import attach_lora, load_base, lora_targets, parameter_counts
from cltune.modeling.scoring import TokenScorer, target_nll
from cltune.training.session import make_accelerator

from helpers import prepared


def test_distilgpt2_shape_has_the_seeds_811008_lora_parameters():
    config = GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=512, n_positions=128)
    model = attach_lora(GPT2LMHeadModel(config), LoraSettings(), new_token_ids=[])
    assert lora_targets(model.get_base_model(), LoraSettings()) == ["c_attn", "c_proj"]
    assert parameter_counts(model)["lora"] == 811_008


def test_llama_targets_attention_and_optionally_mlp(tiny_model_dir):
    model, _ = load_base(ModelSettings(name=str(tiny_model_dir)))
    assert lora_targets(model, LoraSettings()) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_targets(model, LoraSettings(include_mlp=True))[-3:] == ["gate_proj", "up_proj", "down_proj"]


def examples(texts, token="<HOST>"):
    return [Example(0, "Host", token, t, Split.TRAIN, i + 2) for i, t in enumerate(texts)]


def test_new_token_rows_train_while_frozen_weights_stay(tiny_model_dir):
    model, tokenizer, new_ids = prepared(tiny_model_dir)
    embed = lambda: model.get_input_embeddings()(torch.arange(len(tokenizer))).detach().clone()  # noqa: E731
    before = embed()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scorer = TokenScorer(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    enc = encode(examples(["so tell me", "what do you think"]), tokenizer, 24)
    for _ in range(2):
        batch = collate(enc, [0, 1], tokenizer.pad_token_id)
        target_nll(scorer(**batch.model_inputs()), batch.labels).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = embed()
    host = tokenizer.convert_tokens_to_ids("<HOST>")
    old = [i for i in range(len(tokenizer)) if i not in new_ids]
    assert (after[host] - before[host]).abs().max() > 1e-4
    assert torch.equal(after[old], before[old])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_perplexity_of_a_uniform_model_equals_vocabulary_size(tiny_model_dir):
    model, tokenizer, _ = prepared(tiny_model_dir)
    with torch.no_grad():
        # tied embeddings and the new-token rows all zero: every logit is 0, the distribution uniform
        for name, p in model.named_parameters():
            if "embed_tokens" in name:  # the base rows and the trainable delta rows
                p.zero_()
    data = examples(["so tell me what", "pizza", "i really love music and long walks"])
    assert (perplexity(make_accelerator("fp32"), TokenScorer(model), tokenizer, data, 24)
            == pytest.approx(len(tokenizer), rel=1e-5))
    # targets = text tokens + end token; the speaker token is context only
    _, counts = example_nll(make_accelerator("fp32"), TokenScorer(model), encode(data, tokenizer, 24),
                            tokenizer.pad_token_id)
    hand = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1
            for t in ["so tell me what", "pizza", "i really love music and long walks"]]
    assert counts.tolist() == hand


def test_packed_rows_score_each_utterance_as_if_alone(tiny_model_dir):
    model, tokenizer, _ = prepared(tiny_model_dir)
    model.eval()
    enc = encode(examples(["so tell me what", "pizza and music", "i really love long walks outside today", "ok"]),
                 tokenizer, 24)
    scorer = TokenScorer(model)

    def sums(pack):
        batch = collate(enc, [0, 1, 2, 3], tokenizer.pad_token_id, pack)
        with torch.no_grad():
            nll = target_nll(scorer(**batch.model_inputs()), batch.labels)
        return torch.zeros(4).index_add_(0, batch.target_example, nll), batch.input_ids.shape[0]

    alone, rows_alone = sums(None)
    packed, rows_packed = sums(64)
    assert rows_alone == 4 and rows_packed == 1
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_checkpoint_reloads_to_the_same_logits(tiny_model_dir, tmp_path):
    model, tokenizer, _ = prepared(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # LoRA B starts at 0; make the adapter matter
    model.eval()
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<GUEST_A>"), 5, 9, 12]])
    expected = model(input_ids=ids).logits
    meta = {"model": ModelSettings(name=str(tiny_model_dir)).model_dump(), "speaker_tokens": {"Host": "<HOST>"}}
    folder = save_checkpoint(tmp_path / "ckpt", model, tokenizer, meta)
    assert (folder / "adapter_model.safetensors").stat().st_size < 200_000  # adapter + token rows, not the embeddings
    reloaded, tok2, meta2 = load_checkpoint(folder)
    assert len(tok2) == len(tokenizer) and meta2["speaker_tokens"] == {"Host": "<HOST>"}
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_corrupted_checkpoint_is_refused(tiny_model_dir, tmp_path):
    model, tokenizer, _ = prepared(tiny_model_dir)
    folder = save_checkpoint(tmp_path / "ckpt", model, tokenizer,
                             {"model": ModelSettings(name=str(tiny_model_dir)).model_dump()})
    verify(folder)
    blob = folder / "adapter_model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(UserError, match="adapter_model.safetensors is missing or corrupted"):
        load_checkpoint(folder)


def test_missing_model_lists_what_was_tried(tmp_path):
    with pytest.raises(UserError, match="tried the bundled model names .* a local directory .* Hugging Face cache"):
        load_base(ModelSettings(name=str(tmp_path / "nope")))




def test_fast_new_token_path_matches_peft_forward_and_gradients(tiny_model_dir):
    model, tokenizer, new_ids = prepared(tiny_model_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # new rows differ from their initial copy
    model.eval()
    enc = encode(examples(["so tell me what", "pizza"], token="<GUEST_A>"), tokenizer, 24)
    batch = collate(enc, [0, 1], tokenizer.pad_token_id)
    delta = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n)

    fast = target_nll(TokenScorer(model)(**batch.model_inputs()), batch.labels)
    (fast_grad,) = torch.autograd.grad(fast.sum(), delta)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits[batch.labels[:, 1:] != -100],
                                                  batch.labels[:, 1:][batch.labels[:, 1:] != -100], reduction="none")
    (ref_grad,) = torch.autograd.grad(reference.sum(), delta)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert fast_grad.abs().sum() > 0


def test_new_token_rows_get_the_same_gradient_on_every_pass(tiny_model_dir):
    """A speaker token's row gathers the gradient of each of its many positions; summed by parallel float atomics
    (CPU indexing's backward) the order, and so the last bits, changed from pass to pass, and runs of one seed parted
    (bf16 demo runs, 11 steps in). With two threads, enough positions for the parallel path: equal bit for bit."""
    model, tokenizer, _ = prepared(tiny_model_dir)
    enc = encode(examples([f"so tell me what {i} pizza" for i in range(96)], token="<GUEST_A>"), tokenizer, 24)
    batch = collate(enc, list(range(len(enc))), tokenizer.pad_token_id)
    delta = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n)
    scorer, threads = TokenScorer(model), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = [torch.autograd.grad(target_nll(scorer(**batch.model_inputs()), batch.labels).sum(), delta)[0]
                 for _ in range(8)]
    finally:
        torch.set_num_threads(threads)
    assert grads[0].abs().sum() > 0
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_one_scoring_pass_gives_perplexity_and_attribution(tiny_model_dir):
    model, tokenizer, new_ids = prepared(tiny_model_dir)
    with torch.no_grad():  # distinct speaker rows, so the candidate tokens score differently
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0, 1.0)
    acc, scorer, tokens = make_accelerator("fp32"), TokenScorer(model), ["<HOST>", "<GUEST_A>"]
    texts = ["so tell me what", "pizza and music", "i really love long walks", "ok", "what do you think about that",
             "music outside today"]
    data = [Example(0, "Host" if i % 2 else "Guest A", tokens[i % 2], t, Split.TEST, i + 2)
            for i, t in enumerate(texts)]
    scores = score_split(acc, scorer, tokenizer, data, tokens, 24, batch_size=4)
    ppl, attribution = scores.ppl, scores.attribution
    assert ppl == pytest.approx(perplexity(acc, scorer, tokenizer, data, 24), rel=1e-6)
    # by hand: each utterance alone under each token, then the share won by its own token
    nll = [[example_nll(acc, scorer, encode([Example(0, e.speaker, t, e.text, e.split, e.line)], tokenizer, 24),
                        tokenizer.pad_token_id)[0].item() for t in tokens] for e in data]
    hand = sum(tokens[min(range(2), key=row.__getitem__)] == e.token for row, e in zip(nll, data)) / len(data)
    assert attribution == pytest.approx(hand)
    assert all(abs(a - b) > 1e-4 for a, b in nll)  # the distinct rows make the candidates score differently
    single = score_split(acc, scorer, tokenizer, data, tokens[:1], 24)
    assert single.ppl == pytest.approx(ppl, rel=1e-6) and math.isnan(single.attribution)


def test_only_a_complete_utterance_ends_with_the_end_token(tiny_model_dir):
    _, tokenizer, _ = prepared(tiny_model_dir)
    text = "so tell me what do you think about that question today"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos, host = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<HOST>")
    fits, cut = encode(examples([text]), tokenizer, n + 3), encode(examples([text]), tokenizer, n + 2)
    # start token, speaker token, every text token, end token
    assert fits[0][:2] == [tokenizer.bos_token_id, host] and fits[0][-1] == eos and len(fits[0]) == n + 3
    assert fits[0].context == 1  # the start token is context, never a target
    assert cut[0][-1] != eos and len(cut[0]) == n + 2  # one token short: n text tokens, no claimed end
    assert encode(examples([text]), tokenizer, 6)[0] == fits[0][:6]


def test_a_tokenizer_without_a_start_token_encodes_rows_from_the_speaker_token(tmp_path):
    """Models whose tokenizer has no beginning-of-sequence token (GPT-2-style ones may lack it) begin each row with
    the speaker token, and generation prompts the same way."""
    from cltune.modeling.batching import start_ids

    from helpers import TOKENIZER_CORPUS
    from tiny import write_tiny_model

    folder = write_tiny_model(tmp_path / "no-bos", TOKENIZER_CORPUS, bos=False)
    _, tokenizer, _ = prepared(folder)
    assert tokenizer.bos_token_id is None and start_ids(tokenizer) == []
    text = "so tell me what do you think"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    [seq] = encode(examples([text]), tokenizer, n + 2)
    assert seq == [tokenizer.convert_tokens_to_ids("<HOST>"), *tokenizer(text, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id] and seq.context == 0


def test_generation_reads_the_new_token_rows_sparsely_with_the_same_logits(tiny_model_dir):
    """`sparse_token_rows`: the model's own forward (generation's) with the new rows looked up and scored on their
    own gives PEFT's logits, and afterwards the wrappers' forward is PEFT's again."""
    from cltune.modeling.generate import sample_continuations
    from cltune.modeling.scoring import sparse_token_rows

    model, tokenizer, new_ids = prepared(tiny_model_dir)
    wrappers = [m for m in model.modules() if hasattr(m, "token_adapter")]
    assert len(wrappers) == 2  # the embedding and the LM head tied to it
    with torch.no_grad():
        for m in wrappers:
            for delta in m.token_adapter.trainable_tokens_delta.values():
                delta.normal_()  # trained-looking rows, unlike the base's
    ids = torch.tensor([[tokenizer.bos_token_id, new_ids[0], 5, 9, new_ids[1], 7]])
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with sparse_token_rows(model):
            assert all("forward" in m.__dict__ for m in wrappers)
            sparse = model(input_ids=ids).logits
    torch.testing.assert_close(sparse, plain, rtol=1e-5, atol=1e-5)
    assert plain[..., new_ids].abs().sum() > 0 and all("forward" not in m.__dict__ for m in wrappers)
    prompt = [[tokenizer.bos_token_id, new_ids[0]]]
    settings = {"max_new_tokens": 6, "temperature": 0, "top_p": 1, "seed": 0, "batch_size": 1}
    with torch.no_grad():
        expected = tokenizer.decode(model.generate(input_ids=torch.tensor(prompt), max_new_tokens=6, do_sample=False,
                                                   pad_token_id=tokenizer.pad_token_id)[0, 2:],
                                    skip_special_tokens=True).strip()
    assert sample_continuations(model, tokenizer, prompt, **settings)[0] == expected
