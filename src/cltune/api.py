"""The plain functions behind the `cltune` commands; the CLI, the notebook and the tests call these.

A command in `cli.py` only parses its arguments and calls one function here. Nothing calls a
command function from Python: Typer's defaults are `typer.Option` objects, not values, so a
command called as a function runs with truthy placeholders for every flag it was not given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cltune.config import BaseRunConfig, build_config, load_config
from cltune.errors import UserError

if TYPE_CHECKING:
    from cltune.results import RunMetrics


def _catalog():
    from cltune.strategies import REGISTRY

    return REGISTRY.catalog()


def make_config(raw: dict, sets: Sequence[str] | None = (), *, source: str = "config", fixed: dict | None = None) -> BaseRunConfig:
    """A validated run config from a dict, `--set` overrides and `fixed` values, with every registered strategy."""
    return build_config(raw, list(sets or ()), source=source, catalog=_catalog(), fixed=fixed)


def read_config(path: Path | str, sets: Sequence[str] | None = (), *, fixed: dict | None = None) -> BaseRunConfig:
    """A validated run config from a YAML file (task paths relative to it), overrides and `fixed` values."""
    return load_config(path, list(sets or ()), catalog=_catalog(), fixed=fixed)


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def run_config(config: BaseRunConfig, *, overwrite: bool = False, resume: bool = False, console=None,
               report: bool = True, phase1_from: Path | None = None) -> RunMetrics:
    """Run (or with `resume`, continue) the stream `config` describes; writes the report; returns the metrics.
    `phase1_from`: a finished phase-1 checkpoint with the same phase-1 settings, used instead of training."""
    from cltune.pipeline import run
    from cltune.report import print_summary, write_report
    from cltune.rundir import check_run_dir

    check_run_dir(config.run_dir, overwrite, resume=resume)
    metrics = run(config, console=console, resume=resume, reuse_phase1=phase1_from)
    if report and _is_main():
        write_report(config.run_dir)
        if console is not None:
            print_summary(console, metrics)
            console.print(f"report: {config.run_dir / 'report.md'} and {config.run_dir / 'report.html'}")
    return metrics


def config_from(config_path: Path | None, sets: Sequence[str] = (), fixed: dict | None = None) -> BaseRunConfig:
    """A validated config from a YAML file (or defaults when None), `--set` overrides, then `fixed` values."""
    if config_path is not None:
        return read_config(config_path, sets, fixed=fixed)
    return make_config({}, sets, source="command line", fixed=fixed)


def train_single(data: Path, out: Path, *, model: str | None = None, config_path: Path | None = None,
                 sets: Sequence[str] = (), overwrite: bool = False, console=None) -> RunMetrics:
    """Phase 1 alone: LoRA fine-tuning on one dataset; the checkpoint goes to `out/phase1`."""
    from cltune.pipeline import run
    from cltune.rundir import check_run_dir

    # User values go in as values, never pasted into YAML text: a path like O'Brien.csv stays a path.
    fixed = {"tasks": [{"path": str(data)}], "strategy": "naive", "output_dir": str(out.parent), "name": out.name}
    if model:
        fixed["model.name"] = model
    config = config_from(config_path, sets, fixed)
    check_run_dir(config.run_dir, overwrite, resumable=False)
    return run(config, console=console)


def demo_config(config_path: Path, data: Path, out: Path, sets: Sequence[str] = ()) -> BaseRunConfig:
    """The demo config with its task files read from `data` (by file name) and its run under `out`."""
    config = read_config(config_path, sets, fixed={"output_dir": str(out)})
    tasks = []
    for spec in config.tasks:
        path = data / spec.path.name
        if not path.exists():
            raise UserError(f"{config_path}: task {spec.name or spec.path.stem!r}: {path} does not exist; the demo reads "
                            f"its task files by name from {data} (the demo corpus writes host_guest_a/b/c.csv)")
        tasks.append(spec.model_copy(update={"path": path}))
    return config.model_copy(update={"tasks": tasks})


def run_demo(out: Path, data: Path, config_path: Path, sets: Sequence[str] = (), console=None) -> RunMetrics:
    """The main job: write the demo corpus to `data`, then run the demo config (replacing an earlier demo run)."""
    from cltune.data.demo import write_demo_corpus

    for path in write_demo_corpus(data):
        if console is not None:
            console.print(f"wrote {path}")
    return run_config(demo_config(config_path, data, out, sets), overwrite=True, console=console)


def speaker_token(tokens: dict[str, str], speaker: str, where: Path) -> str:
    """The token of `speaker`, given as a name (any case and spacing) or as the token itself."""
    from cltune.data.speakers import speaker_key

    if speaker in tokens.values():
        return speaker
    by_key = {speaker_key(name): token for name, token in tokens.items()}
    token = by_key.get(speaker_key(speaker))
    if token is None:
        known = ", ".join(f"{name} {token}" for name, token in tokens.items())
        raise UserError(f"{where}: unknown speaker {speaker!r}; known: {known}")
    return token


def generate_from(checkpoint: Path, speaker: str, prompt: str = "", *, max_new_tokens: int = 40,
                  temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> str:
    """A continuation of `prompt` in `speaker`'s voice from a saved phase checkpoint (the prompt not repeated),
    from the weights the checkpoint's router gives that speaker, as the run's agnostic evaluation scored it: a
    speaker several tasks share is sampled from the mixture of their weights."""
    from cltune.checkpoint import load_checkpoint
    from cltune.generate import generate_mixture, generate_text
    from cltune.routing import load_router

    model, tokenizer, meta = load_checkpoint(checkpoint)
    token = speaker_token(meta.get("speaker_tokens", {}), speaker, checkpoint)
    router = load_router(checkpoint, model)
    if len(router.agnostic_choices(token)) > 1:
        ids = [tokenizer.convert_tokens_to_ids(token)] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return generate_mixture(model, tokenizer, lambda: router.agnostic_choices(token), ids,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with router.agnostic(token):
        return generate_text(model, tokenizer, token, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed)


def explore(files: Sequence[Path], out: Path, *, max_len: int = 100, model: str | None = None,
            whitespace: bool = False, speaker_col: str | None = None, text_col: str | None = None,
            conversation_col: str | None = None,
            warn=None) -> dict:
    """EDA of dialogue files into `out` (eda.md, eda.json, plots); returns the summary.

    Token lengths use the model's tokenizer (the bundled one by default); without one, whitespace
    words, with a warning through `warn`.
    """
    from cltune.data import load_dialogue
    from cltune.data.eda import summarize, write_eda

    warn = warn or (lambda message: None)
    datasets = [load_dialogue(f, speaker_col=speaker_col, text_col=text_col, conversation_col=conversation_col)
                for f in files]
    for dataset in datasets:
        for note in dataset.report.warnings():
            warn(f"{dataset.path}: {note}")
    count, unit = None, "whitespace words"
    if not whitespace:
        try:
            from cltune.config import ModelSettings
            from cltune.model import load_tokenizer

            settings = ModelSettings(name=model) if model else ModelSettings()
            tokenizer = load_tokenizer(settings)
            count, unit = (lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])), f"{settings.name} tokenizer"
        except UserError as err:
            warn(f"no tokenizer ({err}); counting whitespace words")
    return write_eda([summarize(d, count, max_len) for d in datasets], out, unit, max_len)
