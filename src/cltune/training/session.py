"""The composition root: one validated config → a run's parts (accelerator, data, model, strategy).

`build_session` is the one place that assembles them; the pipeline, the sweep, the notebook, the
benchmarks and the tests all start here, so a run is built the same way wherever it runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from cltune.config import BaseRunConfig
from cltune.data import (
    Dataset,
    TaskData,
    assign_speaker_tokens,
    build_task,
    load_dialogue,
    normalize_speaker,
)
from cltune.data.split import WindowSettings
from cltune.errors import UserError
from cltune.evaluation.evaluate import EarlierScores
from cltune.modeling.batching import start_ids
from cltune.modeling.memory import release_free_memory
from cltune.modeling.model import (
    add_special_tokens,
    attach_lora,
    checkpoint_layers,
    load_base,
    load_tokenizer,
    parameter_counts,
    resize_for,
    settle_dtypes,
)
from cltune.modeling.scoring import TokenScorer
from cltune.storage.files import safe_name
from cltune.strategies import REGISTRY, Context, Registry, Strategy
from cltune.training.tracking import check_trackers


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the `/proc/cpuinfo` text given) has native bf16 matmul units: AVX-512 BF16 or
    AMX. Elsewhere bf16 is emulated and slow."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags")
             for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(setting: str) -> str:
    """What a `model.precision` setting runs as on this machine: "fp32", "bf16" or "fp16".

    `auto` is bf16 where bf16 matmuls are native and measured faster (CPUs with AVX-512 BF16 or AMX,
    GPUs that support it; docs/benchmarks/performance.md), fp16 on older GPUs, fp32 elsewhere.
    """
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def base_dtype(precision: str) -> torch.dtype:
    """The dtype frozen base weights are stored and computed in: bf16 runs keep the base in bf16
    (half the memory, native matmuls, no per-forward casts); fp16 runs use autocast over an fp32 base."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def make_accelerator(precision: str, log_with: Sequence[str] = (), project_dir: Path | None = None) -> Accelerator:
    """A fresh Accelerator for one run at `precision` (a `model.precision` setting or what it resolved to).

    Only fp16 uses Accelerate's autocast (and its loss scaling); a bf16 run stores the frozen base in
    bf16 (`cltune.modeling.model.settle_dtypes`) and its `TokenScorer` runs the matmuls under bf16 autocast.
    Accelerate keeps its settings in process-wide state and
    refuses a second Accelerator with another precision. A run owns its precision, so several runs
    in one process (a notebook, a sweep, the tests) must not inherit the previous one's: the
    accelerator settings are cleared first. The process-level state (device, process group under
    `accelerate launch`) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    # Launched as several processes (torchrun, `accelerate launch --multi_gpu`) on a machine without
    # CUDA: Accelerate only forms the gloo process group when told to use the CPU; otherwise each
    # process would run the whole stream alone and all would write the same files.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    mode = "fp16" if resolve_precision(precision) == "fp16" else "no"
    return Accelerator(mixed_precision=mode, cpu=several and not torch.cuda.is_available(),
                       log_with=list(log_with) or None, project_dir=project_dir)


def load_tasks(config: BaseRunConfig) -> tuple[list[Dataset], list[TaskData], dict[str, str]]:
    """The datasets, their train/val/test splits as tasks, and the speaker → token table."""
    data = config.data
    datasets = []
    for i, spec in enumerate(config.tasks):
        name = safe_name(spec.name or Path(spec.path).stem)
        try:
            datasets.append(load_dialogue(
                spec.path, speaker_col=spec.speaker_col or data.speaker_col, text_col=spec.text_col or data.text_col,
                conversation_col=spec.conversation_col or data.conversation_col,
                aliases=data.aliases, drop_missing=data.drop_missing, name=name,
            ))
        except UserError as err:  # which task of the config the file belongs to, before what is wrong with it
            raise type(err)(f"task {i + 1} ({name}, tasks[{i}] of the config): {err}") from None
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise UserError(f"tasks: names {names} repeat; give each task a distinct `name`")
    tokens = assign_speaker_tokens([s for d in datasets for s in d.speakers], data.speaker_tokens)
    windows = _window_settings(config, datasets) if data.context_turns == "all" else None
    tasks = [build_task(d, i, tokens, data.split, config.seed, data.context_turns, windows,
                        data.one_conversation_per_file)
             for i, d in enumerate(datasets)]
    return datasets, tasks, tokens


def _window_settings(config: BaseRunConfig, datasets: list[Dataset]) -> WindowSettings:
    """How `context_turns: all` measures turns (the model's tokenizer: speaker token, text, end token) and
    which speakers it trains on (`data.targets`, after aliases; each must speak somewhere)."""
    data = config.data
    speakers = {s for d in datasets for s in d.speakers}
    targets = None
    if data.targets is not None:
        targets = tuple(normalize_speaker(t, data.aliases) for t in data.targets)
        unknown = [t for t, n in zip(data.targets, targets) if n not in speakers]
        if unknown:
            raise UserError(f"data.targets: {', '.join(map(repr, unknown))} speak in no task file; the speakers are "
                            f"{', '.join(sorted(speakers))}")
    tokenizer = load_tokenizer(config.model)
    extra = 1 + (tokenizer.eos_token_id is not None)  # the speaker token and the end token

    def turn_lengths(texts: list[str]) -> list[int]:
        return [len(ids) + extra for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    return WindowSettings(turn_lengths, data.max_length - len(start_ids(tokenizer)), targets)  # after the start token


def build_model(config: BaseRunConfig, speaker_tokens: list[str], accelerator: Accelerator, precision: str = "fp32"):
    """Base model + [PAD]/speaker tokens + LoRA, wrapped in the scorer: (model, tokenizer, scorer, new ids, counts).
    With `precision` bf16 the frozen base weights are stored in bf16, the trained ones stay fp32."""
    model, tokenizer = load_base(config.model)
    new_ids = add_special_tokens(tokenizer, speaker_tokens)
    resize_for(model, tokenizer)
    model = attach_lora(model, config.lora, new_ids)
    if config.model.gradient_checkpointing:
        checkpoint_layers(model)
    settle_dtypes(model, base_dtype(precision))
    release_free_memory()  # the loader's fp32 copy of a base now stored in bf16
    scorer = TokenScorer(model, torch.bfloat16 if precision == "bf16" else None,
                         fp32_evaluation=config.eval.precision == "fp32").to(accelerator.device)
    return model, tokenizer, scorer, new_ids, parameter_counts(model)


class Stages:
    """Seconds a run spends per stage, for metrics.json's `stages_s` and the summary's last line: loading
    (data, model, EDA), training, evaluation, the attribution share of it, strategy hooks, the report's
    samples, checkpoints, and the report."""

    ORDER = ("load", "train", "evaluate", "attribution", "hooks", "samples", "save", "report")

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds = {name: 0.0 for name in self.ORDER} | dict(seconds or {})

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def to_json(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}


@dataclass
class Session:
    """Everything one run is made of; `ctx` is what its strategy sees."""

    config: BaseRunConfig
    precision: str  # what ran: "fp32", "bf16" or "fp16"
    accelerator: Accelerator
    datasets: list[Dataset]
    tasks: list[TaskData]
    speaker_tokens: dict[str, str]  # speaker name → token
    ctx: Context
    strategy: Strategy
    counts: dict[str, int]  # parameter counts
    # task index → (fingerprint of the weights that served it, its test PPL, the router's name for them) in the
    # latest matrix row: a phase whose start model is that same model, or a copy of those named weights
    # (`Strategy.starts_as`), reuses the figure instead of scoring the test set again
    served: dict[int, tuple[str, float, str | None]] = field(default_factory=dict)
    earlier: EarlierScores = field(default_factory=EarlierScores)  # the matrix rows' scores of frozen weights
    stages: Stages = field(default_factory=Stages)

    @property
    def model(self):
        return self.ctx.model

    @property
    def tokenizer(self):
        return self.ctx.tokenizer

    @property
    def scorer(self):
        return self.ctx.scorer


def build_session(config: BaseRunConfig, *, registry: Registry = REGISTRY, strategy: str | None = None,
                  log_with: Sequence[str] = ()) -> Session:
    """Assemble a run: precision (chosen once), accelerator (with the trackers `log_with` names, logging under
    RUN/logs), tasks, model with speaker tokens and LoRA, and the config's strategy (or `strategy`, by name,
    from `registry`). Seeded with the config's seed first: the same config builds the same LoRA weights."""
    start = time.perf_counter()
    set_seed(config.seed)
    precision = resolve_precision(config.model.precision)
    accelerator = make_accelerator(precision, check_trackers(log_with), config.run_dir / "logs")
    datasets, tasks, tokens = load_tasks(config)
    model, tokenizer, scorer, new_ids, counts = build_model(config, sorted(set(tokens.values())), accelerator,
                                                            precision)
    ctx = Context(accelerator, model, scorer, tokenizer, tasks, config.data.max_length, config.seed, config.run_dir,
                  new_ids, config.lora, base_dtype(precision), config.eval.batch_size)
    name = strategy or config.strategy
    if name not in registry:
        raise UserError(f"strategy: unknown {name!r}; choose one of {', '.join(registry)}")
    session = Session(config, precision, accelerator, datasets, tasks, tokens, ctx,
                      registry.create(name, ctx, config), counts)
    session.stages.add("load", time.perf_counter() - start)
    return session
