"""Run configuration: YAML → typed models (unknown keys rejected) → `--set` overrides → resolved YAML.

A leaf module: it imports no other part of cltune but its errors, and no torch. Strategy settings
live beside each strategy; the caller passes a `Catalog` of the registered strategies (their
names and settings sections, `cltune.strategies.REGISTRY.catalog()`), and `run_config_model`
adds one section per settings class, so `ewc: {lambda: 10}` is validated by the EWC file's model.
"""

from __future__ import annotations

import difflib
import functools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from cltune.errors import UserError

BUNDLED_MODEL = "smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSettings(Strict):
    name: str = Field(BUNDLED_MODEL, description="bundled model name, a local HF model directory, or a cached hub id")
    trust_remote_code: bool = Field(False, description="allow the model's own Python code (off unless you trust it)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="bf16: frozen base weights stored in bf16 and matmuls in bf16, while the residual stream, "
        "norms, LoRA weights, new-token rows, optimizer and losses stay fp32 (training and evaluation alike); fp16: "
        "autocast over an fp32 base (GPUs); auto: bf16 where the CPU (AVX-512 BF16, AMX) or GPU has native bf16, fp16 "
        "on older GPUs, else fp32"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations during backward instead of keeping them: "
        "training memory grows with one layer's activations instead of every layer's, for about a third more "
        "compute (big models, long rows; docs/benchmarks/performance.md)"
    )


class LoraSettings(Strict):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(None, description="module names; default chosen per architecture")
    include_mlp: bool = Field(False, description="also adapt MLP projections (Llama family)")
    train_new_tokens: bool = Field(True, description="train the embedding rows of the added speaker/pad tokens")


class DataSettings(Strict):
    speaker_col: str | None = Field(None, description="speaker column; default: detected")
    text_col: str | None = Field(None, description="text column; default: detected")
    conversation_col: str | None = Field(None, description="conversation id column; default: detected (conversation, "
                                         "dialogue_id, episode, session, ...); when present, splits keep each "
                                         "conversation whole; 'none': split by utterance")
    aliases: dict[str, str] = Field(default_factory=dict, description='speaker aliases, e.g. {"Lex": "Lex Fridman"}')
    speaker_tokens: dict[str, str] = Field(default_factory=dict,
                                           description='token overrides, e.g. {"Lex Fridman": "<LF>"}')
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/validation/test fractions")
    max_length: int = Field(100, ge=4, description="tokens per example: the target utterance (its speaker token and "
                            "end token included) and its context turns; the target is kept first (cut only when it "
                            "alone is longer), then the context fills what is left, oldest turns dropped first")
    context_turns: Annotated[int, Field(ge=0)] | Literal["all"] = Field(
        0, description="earlier turns of the same conversation shown before each utterance (each with its speaker "
        "token, context only: never in that utterance's loss or perplexity); conversations come from the conversation "
        "column or, without one, from blank rows between them; 0: every utterance alone; all: whole conversations, "
        "cut into windows of max_length tokens computed in one pass each, every earlier turn of the window as context "
        "(at least half a window once a conversation is longer than one)")
    targets: list[str] | None = Field(None, description="with context_turns: all, the speakers whose turns are "
                                      "trained and scored; the others' turns are context only; null: every speaker")
    drop_missing: bool = Field(False, description="drop rows with missing text instead of stopping with an error")
    one_conversation_per_file: bool = Field(
        False, description="each file is one conversation (a transcript): context turns run through the file, and "
        "the split takes consecutive parts of it (the first turns train, the next validate, the last test) instead "
        "of whole conversations")

    @model_validator(mode="after")
    def _targets_need_windows(self):
        if self.targets is not None and self.context_turns != "all":
            raise ValueError("data.targets picks the trained speakers of whole conversations; it needs "
                             "data.context_turns: all")
        return self

    @field_validator("split")
    @classmethod
    def _fractions(cls, v):
        if any(f <= 0 for f in v) or abs(sum(v) - 1) > 1e-6:
            raise ValueError("split fractions must be positive and sum to 1")
        return v


class TaskSpec(Strict):
    path: Path = Field(description="CSV or JSONL file, one utterance per row (in a config file, `glob: PATTERN` "
                       "instead gives one task per matching file, in sorted order)")
    name: str | None = Field(None, description="task name; default: the file's stem")
    speaker_col: str | None = None
    text_col: str | None = None
    conversation_col: str | None = None

    _home = field_validator("path")(lambda v: v.expanduser())  # `~` is the user's home, in YAML and --set alike


class PhaseSettings(Strict):
    epochs: float = Field(2, gt=0, description="passes over the phase's training data")
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps (overrides epochs when smaller)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    token_lr: float | None = Field(None, gt=0, description="learning rate of the new token rows (speaker tokens, "
                                   "[PAD]); null: `lr`")
    speaker_loss: float = Field(0.0, ge=0, description="weight of a speaker-discrimination loss added to the LM loss: "
                                "the mean over a step's utterances of −log p(own speaker given the text and context), "
                                "p ∝ the "
                                "text's likelihood after each speaker token of its dataset (what attribution scores); "
                                "each other speaker costs one more forward and backward per utterance; 0: off")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warmup")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warmup")
    batch_size: int = Field(32, ge=1, description="utterances per optimizer step (the reference pipeline's 2 × 16)")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="utterances per forward pass (speed and memory only: which utterances share a step, and "
        "the token-weighted loss, do not depend on it); auto: 32 where matmuls run in bf16 (AMX/AVX-512 BF16 CPUs, "
        "GPUs), else 8")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    max_micro_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="split a micro-batch whose padded size (utterances × longest) exceeds this many token "
        "positions, so a few long utterances cannot set the peak memory; the step's math stays the same; auto: 400 on "
        "a CPU, no limit on a GPU; null: never split")
    window_lead_grad: bool = Field(True, description="context_turns: all — back-propagate through each window's "
                                   "lead (the turns before its first target: in a long conversation's later windows, "
                                   "the half window it re-reads from the window before); false computes the lead "
                                   "forward only: the same forward and loss, no gradient through the lead's keys and "
                                   "values (on the demo, 0.94× the training time at +1–2% test perplexity)")
    packing: bool = Field(False, description="pack utterances into rows with per-utterance attention and positions")
    pack_length: int = Field(256, ge=8, description="tokens per packed row")
    early_stopping_patience: int | None = Field(None, ge=1,
                                                description="stop after this many evaluations without val improvement")
    eval_every: int | None = Field(None, ge=1, description="validate every N steps (default: at the end of the phase, "
                                   "and once per epoch with early stopping)")
    checkpoint_every: int | None = Field(25, ge=1, description="save a resumable step checkpoint (weights, optimizer, "
                                         "scheduler, strategy state, data position) every N optimizer steps; null: "
                                         "only at the "
                                         "end of training; `cltune run --resume` continues from the latest")
    save_total_limit: int = Field(1, ge=1, description="step checkpoints kept on disk during a phase")


PhaseOverride = create_model(
    "PhaseOverride",
    __base__=Strict,
    **{name: (f.annotation | None, None) for name, f in PhaseSettings.model_fields.items()},
)


class EvalSettings(Strict):
    attribution: bool = Field(True, description="score speaker attribution on the test split")
    samples_per_speaker: int = Field(2, ge=0, description="sample generations per speaker after each phase")
    max_new_tokens: int = Field(30, ge=1, description="length of each sample generation")
    batch_size: int = Field(32, ge=1, description="utterances per evaluation forward pass")
    precision: Literal["fp32", "run"] = Field(
        "fp32", description="arithmetic of evaluation: fp32 (figures comparable across machines; a bf16 run upcasts "
        "its frozen base meanwhile) or the run's precision (faster; bf16 reads up to ~1.5% higher)")


class BaseRunConfig(Strict):
    name: str = Field("run", description="run name; outputs go to output_dir/name")
    seed: int = Field(0, description="seed for splits, sampling, data order and initialization")
    output_dir: Path = Field(Path("checkpoints"), description="parent folder of run folders")
    strategy: str = Field("progressive", description="continual-learning strategy (see `cltune strategies`)")
    plugins: list[str] = Field(default_factory=list, description="Python modules imported before the config is "
                               "checked, e.g. [my_strategies.l2_anchor]: each registers its strategy (`STRATEGY = "
                               "YourClass`); importable wherever the run runs (installed, or on PYTHONPATH)")
    model: ModelSettings = Field(default_factory=ModelSettings, description="base model (section below)")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter (section below)")
    data: DataSettings = Field(default_factory=DataSettings, description="reading and splitting the datasets")
    tasks: list[TaskSpec] = Field(min_length=1, description="datasets in the order they are learned")
    train: PhaseSettings = Field(default_factory=PhaseSettings, description="defaults for every phase")
    phases: list[PhaseOverride] = Field(default_factory=list,  # type: ignore[valid-type]
                                        description="per-phase overrides; `phase2.epochs` = phases[1]")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="evaluation after each phase")

    _home = field_validator("output_dir")(lambda v: v.expanduser())

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def phase(self, index: int) -> PhaseSettings:
        """Settings of phase `index` (0-based): the train defaults with that phase's overrides."""
        merged = self.train.model_dump()
        if index < len(self.phases):
            merged.update({k: v for k, v in self.phases[index].model_dump().items() if v is not None})
        return PhaseSettings(**merged)


@dataclass(frozen=True)
class Catalog:
    """What validation needs to know of the strategies: their names and their settings sections."""

    names: tuple[str, ...]
    sections: tuple[tuple[str, type[BaseModel]], ...]  # (config section, settings model), e.g. ("ewc", EWCSettings)


@functools.lru_cache(maxsize=8)
def run_config_model(catalog: Catalog) -> type[BaseRunConfig]:
    """The RunConfig class with one validated section per strategy settings model of `catalog`."""
    # Building the model takes a tenth of a second; keyed by the catalog, it is built once.
    fields = {name: (cls, Field(default_factory=cls)) for name, cls in catalog.sections}
    return create_model("RunConfig", __base__=BaseRunConfig, **fields)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if keys[0].startswith("phase") and keys[0][5:].isdigit():
        index = int(keys[0][5:]) - 1
        if index < 0:
            raise UserError(f"--set {dotted}: phases count from phase1")
        phases = tree.setdefault("phases", [])
        if not isinstance(phases, list):
            raise UserError(f"--set {dotted!r}: `phases` must be a list of per-phase settings, "
                            f"not {type(phases).__name__}")
        while len(phases) <= index:
            phases.append({})
        node = phases[index]
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted!r}: phases[{index}] must be a mapping of settings, "
                            f"not {type(node).__name__}")
        keys = keys[1:]
    else:
        node = tree
    if not keys:
        raise UserError(f"--set {dotted!r}: name a setting of the phase, e.g. --set {dotted}.epochs=2")
    for key in keys[:-1]:
        node = _child(node, key, dotted)
        if not isinstance(node, (dict, list)):
            raise UserError(f"--set {dotted!r}: {key!r} is not a section")
    if isinstance(node, list):
        _child(node, keys[-1], dotted)  # the item must exist: a list is replaced item by item, never extended
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def _child(node: dict | list, key: str, dotted: str):
    """The section `key` of `node`; a list takes an existing item number only."""
    if isinstance(node, dict):
        return node.setdefault(key, {})
    if not key.isdigit() or int(key) >= len(node):
        raise UserError(f"--set {dotted!r}: {key!r} is not an item of that list (it has {len(node)})")
    return node[int(key)]


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set phase2.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            raise UserError(f"--set {pair!r}: the value is not valid YAML; quote it, "
                            "e.g. --set name='my run'") from None
        parsed.append((key.strip(), value))
    return parsed


REFERENCE_HINT = "every key: `cltune config-reference`"


def _section_model(annotation) -> type[BaseModel] | None:
    """The settings model a field holds, through list[...], X | None and Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys (names and aliases) a config section accepts, the section named by `loc` (e.g. ("ewc",),
    ("tasks", 0)); empty where `loc` leaves the models."""
    for part in loc:
        if isinstance(part, int):  # an item of a list: the list's own model already stands for it
            continue
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        field = fields.get(part) or model.model_fields.get(part)
        model = _section_model(field.annotation) if field is not None else None
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """ " (did you mean PREFIX+X?)" for the choice closest to `word`, or "" where none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)  # 0.6 offered olora for colour
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _format_error(err: ValidationError, source: str, model: type[BaseModel] = BaseRunConfig) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden" and loc:
        section = "".join(f"{part}." for part in loc[:-1])
        hint = did_you_mean(str(loc[-1]), known_keys(model, loc[:-1]), section)
        message = f"{source}: {where}: unknown key{hint}{more}; {REFERENCE_HINT}"
    else:
        message = f"{source}: {where}: {first['msg']}{more}; fix the config or its --set override"
    return " ".join(message.split())  # keys come from the user: one line whatever they hold


def build_config(raw: dict, overrides: list[str] | None = None, source: str = "config", *, catalog: Catalog,
                 fixed: dict[str, Any] | None = None) -> BaseRunConfig:
    """Validate `raw` after the `--set KEY=VALUE` `overrides` (values parsed as YAML), then `fixed`.

    `fixed` maps dotted keys to values taken as they are, never parsed: what a command sets from
    its own arguments (a file path with a quote in it stays that path).
    """
    tree = dict(raw)
    for key, value in [*parse_overrides(overrides or []), *(fixed or {}).items()]:
        _set_path(tree, key, value)
    model = run_config_model(catalog)
    try:
        config = model.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_error(err, source, model)) from None
    for k in range(len(config.phases)):  # overrides carry no bounds of their own: check each merged phase now
        try:
            config.phase(k)
        except ValidationError as err:
            raise UserError(_format_error(err, f"{source}: phase{k + 1}", PhaseSettings)) from None
    if config.strategy not in catalog.names:
        raise UserError(f"{source}: strategy: unknown {config.strategy!r}"
                        f"{did_you_mean(config.strategy, list(catalog.names))}; "
                        f"choose one of {', '.join(catalog.names)} (`cltune strategies` describes them)")
    return config


def _expand_glob(task, base: Path, source: Path) -> list:
    """A task entry `{glob: PATTERN, ...}` as one task per matching file, sorted by path (relative patterns are read
    against the config's folder); every other entry as it is."""
    if not isinstance(task, dict) or "glob" not in task:
        return [task]
    pattern, rest = str(task["glob"]), {k: v for k, v in task.items() if k != "glob"}
    if "path" in rest or "name" in rest:
        raise UserError(f"{source}: a task with glob {pattern!r} names its files by the pattern; drop its "
                        f"{'path' if 'path' in rest else 'name'} (each task is named after its file)")
    full = Path(pattern).expanduser()
    root = full.anchor if full.is_absolute() else base
    relative = str(full.relative_to(full.anchor)) if full.is_absolute() else pattern
    matches = sorted(p for p in Path(root).glob(relative) if p.is_file())
    if not matches:
        raise UserError(f"{source}: tasks: glob {pattern!r} matches no file under {Path(root).resolve()}; check the "
                        "pattern (it is read against the config file's folder)")
    return [{**rest, "path": str(p)} for p in matches]


def load_config(path: str | Path, overrides: list[str] | None = None, *, catalog: Catalog,
                fixed: dict[str, Any] | None = None) -> BaseRunConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found; check the path") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte {err.start} is not UTF-8; save the config as UTF-8 text") from None
    except (OSError, ValueError) as err:  # a folder, no permission, a NUL in the name
        raise UserError(f"{path}: cannot read the config ({type(err).__name__}); pass a readable YAML file") from None
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply; the config is a flat mapping of sections") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: {line}invalid YAML; fix the syntax there") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: line 1: expected a mapping of settings at the top level")
    base = path.parent
    tasks = raw.get("tasks")
    if isinstance(tasks, list):
        tasks = raw["tasks"] = [t for task in tasks for t in _expand_glob(task, base, path)]
    for task in tasks if isinstance(tasks, list) else []:  # task paths are relative to the config file
        if isinstance(task, dict) and "path" in task and not Path(str(task["path"])).expanduser().is_absolute():
            candidate = base / str(task["path"])
            task["path"] = str(candidate if candidate.exists() or not Path(str(task["path"])).exists()
                               else task["path"])
    return build_config(raw, overrides, source=str(path), catalog=catalog, fixed=fixed)


def dump_config(config: BaseRunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
