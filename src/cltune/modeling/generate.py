"""Sampling continuations in a speaker's style: the start token, context turns (optional), the speaker token, then an
optional prompt — the layout training encoded (`cltune.modeling.batching`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from transformers.generation.streamers import BaseStreamer

from cltune.modeling.batching import context_of, encode, start_ids
from cltune.modeling.scoring import sparse_token_rows

SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.8, 0.95  # the report's sample generations and generate_text's defaults


class TextStream(BaseStreamer):
    """Hands `emit` each new piece of a generation's text as tokens arrive (the generation's streamer).

    The first `put` is the prompt and is skipped, as `generate` sends it first. The text is decoded
    whole each time and only its new end emitted, so a character split over several tokens comes
    out once complete; the text is stripped as the returned text is (a space comes out with the word after it).
    """

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += torch.as_tensor(value).view(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()  # spaces wait for what follows them
        if len(text) > self.shown and not text.endswith("\ufffd"):  # not inside a multi-byte character
            self.emit(text[self.shown :])
            self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if len(text) > self.shown:
            self.emit(text[self.shown :])
        self.shown = len(text)


class PrefixCache:
    """One conversation's keys and values under one set of weights, kept from one generation to the next.

    A chat's next prompt starts with the previous one and its reply, so `sample_continuations` computes
    only the tokens after the longest prefix the two share; the rest of the cache is dropped. The cache
    holds every token of the last sequence but its final one (generation never feeds that one back).
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.cache = None
        self.reused = 0  # tokens of the last prompt read from the cache

    def prepare(self, ids: list[int]):
        """The cache for a generation from `ids`, cut to the prefix it shares with them (at least one token of
        `ids` is left to compute)."""
        from transformers import DynamicCache

        keep = 0
        for held, new in zip(self.ids, ids[: len(ids) - 1]):
            if held != new:
                break
            keep += 1
        if self.cache is None or keep == 0:
            self.cache = DynamicCache()
        elif self.cache.get_seq_length() > keep:
            self.cache.crop(keep - self.cache.get_seq_length())  # a negative count: the tokens to drop
        self.ids, self.reused = self.ids[:keep], keep
        return self.cache

    def hold(self, sequence: list[int]) -> None:
        """Record the tokens the cache now holds: the start of `sequence` (prompt and reply)."""
        self.ids = list(sequence[: self.cache.get_seq_length()])


@torch.no_grad()
def sample_continuations(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
    seed: int, batch_size: int, streamer: BaseStreamer | None = None, cache: PrefixCache | None = None,
) -> list[str]:
    """One sampled continuation per prompt (token ids), decoded and stripped (empty ones included).

    The prompts must all have one length, so rows need no padding and `batch_size` of them share
    a forward pass. Each chunk reseeds with seed + its first row, so samples depend on `seed` and
    `batch_size`, not on earlier calls. Temperature 0 is greedy decoding. A `streamer` (one prompt)
    receives the tokens as they come; a `cache` (one prompt) carries keys and values over from the
    previous call, so a prompt that extends the last one computes only its new tokens.
    """
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("sample_continuations: prompts of different lengths would need padding")
    if cache is not None and len(prompts) != 1:
        raise ValueError("sample_continuations: a prefix cache serves one prompt")
    device = next(model.parameters()).device
    sampling = temperature > 0
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with sparse_token_rows(model):  # generation reads the new token rows without rebuilding the vocabulary matrix
            for start in range(0, len(prompts), batch_size):
                inputs = torch.tensor(prompts[start : start + batch_size], dtype=torch.long, device=device)
                torch.manual_seed(seed + start)
                reuse = {} if cache is None else {"cache": cache.prepare(prompts[0])}
                out = model.generate(
                    input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                    do_sample=sampling, temperature=temperature if sampling else None,
                    top_p=top_p if sampling else None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, streamer=streamer, **reuse,
                )
                if cache is not None:
                    cache.hold(out[0].tolist())
                texts += [t.strip() for t in tokenizer.batch_decode(out[:, inputs.shape[1]:], skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return texts


def generate_text(
    model, tokenizer, speaker_token: str, prompt: str = "", *, max_new_tokens: int = 40,
    temperature: float = SAMPLE_TEMPERATURE, top_p: float = SAMPLE_TOP_P, seed: int = 0,
) -> str:
    """One continuation of `<bos> <SPEAKER> prompt`."""
    ids = [*start_ids(tokenizer), tokenizer.convert_tokens_to_ids(speaker_token),
           *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return sample_continuations(model, tokenizer, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, batch_size=1)[0]


def sample_utterances(
    model, tokenizer, speaker_token: str, n: int, *, max_new_tokens: int, temperature: float, top_p: float,
    seed: int, batch_size: int,
) -> list[str]:
    """`n` utterances prompted by the speaker token alone, after the start token (generative replay's pseudo-data)."""
    prompt = [*start_ids(tokenizer), tokenizer.convert_tokens_to_ids(speaker_token)]
    return sample_continuations(model, tokenizer, [prompt] * n,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, batch_size=batch_size)


def sample_rows(ctx, router, tasks, settings, phase: int, seed: int) -> list[dict]:
    """`settings.samples_per_speaker` generations per speaker of each task, each task served by the weights
    `router.oracle` gives it; the report's sample table. Without context turns each is prompted by the speaker
    token alone (one seeded batch of every task's prompts where one model serves them all, else one per
    task); with them, each answers a test utterance's real context (seeded
    choice among the test utterances that have one) and the true reply is kept beside it."""
    out: list[dict] = []
    alone = [task for task in tasks if not any(e.context for e in task.test)]
    prompted = {task.index for task in alone}
    # One model for every task (no task routing): every task's prompts share one batch, as a generation step
    # costs about the same for 4 rows as for 8; otherwise one batch per task, under the weights serving it.
    groups = [alone] if alone and not router.task_routed else [[task] for task in alone]
    by_task: dict[str, list[dict]] = {}
    for group in groups:
        rows = [(task, speaker, token) for task in group for speaker, token in task.tokens.items()
                for _ in range(settings.samples_per_speaker)]
        if not rows:
            continue
        start = start_ids(ctx.tokenizer)
        prompts = [[*start, ctx.tokenizer.convert_tokens_to_ids(token)] for _, _, token in rows]
        with router.oracle(group[0].index):
            texts = sample_continuations(ctx.model, ctx.tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                         temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=seed,
                                         batch_size=len(prompts))
        for (task, speaker, token), text in zip(rows, texts):
            by_task.setdefault(task.name, []).append(
                {"phase": phase, "task": task.name, "speaker": speaker, "token": token, "text": text})
    for task in tasks:  # in task order, whichever way each was sampled
        out += _replies_in_context(ctx, router, task, settings, phase, seed) if task.index not in prompted else \
            by_task.get(task.name, [])
    return out


def _replies_in_context(ctx, router, task, settings, phase: int, seed: int) -> list[dict]:
    rng = random.Random(seed * 1_000 + task.index)
    chosen = []
    for speaker in task.tokens:
        candidates = [e for e in task.test if e.context and e.speaker == speaker]
        chosen += rng.sample(candidates, min(settings.samples_per_speaker, len(candidates)))
    rows = []
    with router.oracle(task.index):
        for i, (example, encoded) in enumerate(zip(chosen, encode(chosen, ctx.tokenizer, ctx.max_length))):
            prompt = list(encoded[: context_of(encoded) + 1])  # the context as training saw it, then the speaker token
            text = sample_continuations(ctx.model, ctx.tokenizer, [prompt], max_new_tokens=settings.max_new_tokens,
                                        temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=seed + i,
                                        batch_size=1)[0]
            rows.append({"phase": phase, "task": task.name, "speaker": example.speaker, "token": example.token,
                         "text": text, "context": [[t.speaker, t.text] for t in example.context],
                         "reference": example.text})
    return rows


@torch.no_grad()
def generate_mixture(
    model, tokenizer, candidates: Callable[[], list[AbstractContextManager]], ids: list[int], *, max_new_tokens: int,
    temperature: float = SAMPLE_TEMPERATURE, top_p: float = SAMPLE_TOP_P, seed: int = 0, start: int = 0,
    streamer: BaseStreamer | None = None,
) -> str:
    """A continuation of `ids` (context turns, the speaker token at index `start`, then the prompt) sampled from the
    equal-prior mixture of several candidate weights — what evaluation scores for a speaker several tasks share.

    Each token is drawn from Σ_c π_c p_c(· | x<t) with the posterior π_c ∝ p_c(x_{start+1}..x_{t−1}), the tokens
    after the speaker token (prompt and sampled ones, untempered; the context, like evaluation's, is not scored);
    temperature and top-p then shape that distribution. `candidates()` gives fresh contexts, one per candidate, in
    the same order each call. Each candidate keeps its own key/value cache and running score, so a token costs one
    forward of that token per candidate (the prompt is read once per candidate).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    sequence = list(ids)
    if streamer is not None:
        streamer.put(torch.tensor(ids))  # the prompt, as generate sends it first
    caches: list = []
    scores: torch.Tensor | None = None  # per candidate: Σ log p of the tokens after the speaker token so far
    pending, offset = list(ids), 0  # tokens not yet through the model, and the position of the first of them
    try:
        with sparse_token_rows(model):
            for _ in range(max_new_tokens):
                inputs = torch.tensor([pending], dtype=torch.long, device=device)
                last, seen = [], []
                for i, weights in enumerate(candidates()):
                    if i == len(caches):
                        caches.append(DynamicCache())
                    with weights:
                        logits = model(input_ids=inputs, cache=caches[i], use_cache=True).logits[0]
                    log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (pending positions, vocab)
                    # position p predicts token p + 1: score those after the speaker token
                    positions = range(max(start, offset), len(sequence) - 1)
                    scored = [log_probs[p - offset, sequence[p + 1]] for p in positions]
                    seen.append(torch.stack(scored).sum() if scored else torch.zeros(()))
                    last.append(log_probs[-1])
                stacked = torch.stack(last)  # (candidates, vocab): each candidate's next-token distribution
                scores = torch.stack(seen) if scores is None else scores + torch.stack(seen)
                mixture = torch.logsumexp(torch.log_softmax(scores, dim=0)[:, None] + stacked, dim=0)
                token = sample_token(mixture, temperature, top_p, generator)
                if len(sequence) - 1 >= start:  # the last position's score of the token just drawn
                    scores = scores + stacked[:, token]
                offset, pending = len(sequence), [token]
                sequence.append(token)
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if token == tokenizer.eos_token_id:
                    break
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
    return tokenizer.decode(sequence[len(ids):], skip_special_tokens=True).strip()


def sample_token(log_probs: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from a log-distribution: greedy at temperature 0, else tempered and cut to the top-p mass
    (the smallest set of most likely tokens whose probability reaches top_p)."""
    if temperature <= 0:
        return int(log_probs.argmax())
    probs = torch.softmax(log_probs / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(-1) - ordered < top_p  # a token is kept while the mass before it is short of top_p
    ordered = ordered * keep
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])
