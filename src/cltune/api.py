"""The plain functions behind the `cltune` commands; the CLI, the notebook and the tests call these.

A command in `cli.py` only parses its arguments and calls one function here. Nothing calls a
command function from Python: Typer's defaults are `typer.Option` objects, not values, so a
command called as a function runs with truthy placeholders for every flag it was not given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cltune.config import BaseRunConfig
from cltune.errors import UserError
from cltune.studies.runconfig import make_config, read_config

if TYPE_CHECKING:
    from cltune.data.starter import Starter
    from cltune.evaluation.results import RunMetrics

__all__ = ["make_config", "read_config"]  # with the functions below: what the CLI, notebook and tests call


def run_config(config: BaseRunConfig, *, overwrite: bool = False, resume: bool = False, console=None,
               report: bool = True, phase1_from: Path | None = None, log_with: Sequence[str] = ()) -> RunMetrics:
    """Run (or with `resume`, continue) the stream `config` describes; writes the report; returns the metrics.
    `phase1_from`: a finished phase-1 checkpoint with the same phase-1 settings, used instead of training.
    `log_with`: experiment trackers (tensorboard, wandb, mlflow) to log to."""
    from cltune.report import print_summary, write_report
    from cltune.storage.runlock import main_process
    from cltune.studies.pipeline import run_stream
    from cltune.training.rundir import check_run_dir

    with _claimed(config, console):  # before anything reads or replaces what the folder holds
        check_run_dir(config.run_dir, overwrite, resume=resume)
        metrics = run_stream(config, console=console, resume=resume, reuse_phase1=phase1_from, log_with=log_with)
        if report and main_process():
            start = time.perf_counter()
            write_report(config.run_dir)
            if metrics.stages_s is not None:  # the report's own time joins the stages it could not show
                stages = {**metrics.stages_s, "report": round(time.perf_counter() - start, 2)}
                metrics = metrics.model_copy(update={"stages_s": stages})
                metrics.write(config.run_dir / "metrics.json")
    if report and main_process() and console is not None:
        print_summary(console, metrics)
        console.print(f"report: {config.run_dir / 'report.md'} and {config.run_dir / 'report.html'}")
    return metrics


def _claimed(config: BaseRunConfig, console=None):
    """This process's hold on the run folder (the main process's, in a distributed run): a second run into
    it refuses at start, naming the holder; an unwritable folder is refused before any training."""
    from cltune.storage.runlock import claim, main_process

    main = main_process()
    return claim(config.run_dir, enabled=main, notify=(lambda note: console.print(f"note: {note}", markup=False))
                 if console is not None and main else None)


def config_from(config_path: Path | None, sets: Sequence[str] = (), fixed: dict | None = None) -> BaseRunConfig:
    """A validated config from a YAML file (or defaults when None), `--set` overrides, then `fixed` values."""
    if config_path is not None:
        return read_config(config_path, sets, fixed=fixed)
    return make_config({}, sets, source="command line", fixed=fixed)


def column_settings(speaker_col: str | None = None, text_col: str | None = None,
                    conversation_col: str | None = None) -> dict[str, str]:
    """The columns the command line named (--speaker-col and friends): {"speaker_col": "who", ...}."""
    given = {"speaker_col": speaker_col, "text_col": text_col, "conversation_col": conversation_col}
    return {key: value for key, value in given.items() if value is not None}


def with_columns(config: BaseRunConfig, columns: dict[str, str] | None) -> BaseRunConfig:
    """`config` with the command line's columns for every task: they win over the config's own, per task too."""
    if not columns:
        return config
    return config.model_copy(update={
        "data": config.data.model_copy(update=columns),
        "tasks": [spec.model_copy(update=columns) for spec in config.tasks],
    })


def init_config(files: Sequence[Path], out: Path, *, name: str | None = None, strategy: str | None = None,
                model: str | None = None, overwrite: bool = False, columns: dict[str, str] | None = None,
                drop_missing: bool = False, warn=None) -> Starter:
    """`cltune init`: read each dialogue file (an error names the file and the row), write a commented starter
    config to `out` after checking that it loads as a run config; nothing is written when anything fails."""
    from cltune.data.starter import Starter, read_files, starter_text
    from cltune.storage.files import atomic_write_text

    datasets = read_files(files, out, overwrite=overwrite, columns=columns or {}, drop_missing=drop_missing, warn=warn)
    text = starter_text(files, datasets, out, name=name, strategy=strategy, model=model,
                        no_conversations=(columns or {}).get("conversation_col", "").strip().casefold() == "none",
                        drop_missing=drop_missing)
    check = out.with_name(f".{out.name}.check")  # read back through the real loader (relative paths and all)
    try:
        atomic_write_text(check, text)
        config = read_config(check)
    except UserError as err:  # name the file the user asked for, not the check copy
        raise UserError(str(err).replace(str(check), str(out))) from None
    finally:
        check.unlink(missing_ok=True)
    atomic_write_text(out, text)
    return Starter(out, config)


def train_single(data: Path, out: Path, *, model: str | None = None, config_path: Path | None = None,
                 sets: Sequence[str] = (), overwrite: bool = False, resume: bool = False, console=None,
                 log_with: Sequence[str] = (), columns: dict[str, str] | None = None) -> RunMetrics:
    """Phase 1 alone: LoRA fine-tuning on one dataset; the checkpoint goes to `out/phase1`; `resume`
    continues a stopped one. `columns`: the command line's columns (`column_settings`)."""
    from cltune.studies.pipeline import run_stream
    from cltune.training.rundir import check_run_dir

    # User values go in as values, never pasted into YAML text: a path like O'Brien.csv stays a path.
    fixed = {"tasks": [{"path": str(data)}], "strategy": "naive", "output_dir": str(out.parent), "name": out.name}
    if model:
        fixed["model.name"] = model
    config = with_columns(config_from(config_path, sets, fixed), columns)
    with _claimed(config, console):
        check_run_dir(config.run_dir, overwrite, resume=resume)
        return run_stream(config, console=console, resume=resume, log_with=log_with)


def shipped_config(name: str):
    """A run config shipped inside the package (`configs/NAME.yaml`), as a context manager giving its path:
    it works from any folder and after a plain `pip install`."""
    from importlib.resources import as_file, files

    return as_file(files("cltune").joinpath("configs", f"{name}.yaml"))


SHIPPED_CONFIGS = ("demo", "podcast")  # `cltune demo --config NAME` takes these names as well as a file


def shipped_name(config_path: Path | None) -> str | None:
    """The shipped config `config_path` names (None: the demo's), or None when it is a file to read."""
    if config_path is None:
        return "demo"
    text = str(config_path)
    return text if text in SHIPPED_CONFIGS and not config_path.exists() else None


def demo_config(config_path: Path | None, data: Path, out: Path, sets: Sequence[str] = ()) -> BaseRunConfig:
    """The demo config (the shipped one when `config_path` is None, or a shipped one by name: demo, podcast) with
    its task files read from `data` (by file name) and its run under `out`."""
    name = shipped_name(config_path)
    if name is not None:
        with shipped_config(name) as path:
            return demo_config(path, data, out, sets)
    config = read_config(config_path, sets, fixed={"output_dir": str(out)})
    tasks = []
    for spec in config.tasks:
        path = data / spec.path.name
        if not path.exists():
            raise UserError(f"{config_path}: task {spec.name or spec.path.stem!r}: {path} does not exist; "
                            f"the demo reads its task files by name from {data} "
                            "(the demo corpus writes host_guest_a/b/c.csv)")
        tasks.append(spec.model_copy(update={"path": path}))
    return config.model_copy(update={"tasks": tasks})


def run_demo(out: Path, data: Path, config_path: Path | None = None, sets: Sequence[str] = (), console=None,
             log_with: Sequence[str] = (), resume: bool = False) -> RunMetrics:
    """The main job: write the demo corpus to `data`, then run the demo config (replacing an earlier demo run,
    or with `resume` continuing a stopped one)."""
    from cltune.data.demo import guest_count, write_demo_corpus

    for path in write_demo_corpus(data, guests=guest_count(_task_files(config_path))):
        if console is not None:
            console.print(f"wrote {path}")
    return run_config(demo_config(config_path, data, out, sets), overwrite=not resume, resume=resume, console=console,
                      log_with=log_with)


def _task_files(config_path: Path | None) -> list[str]:
    """The task file names a demo config reads (none when the file cannot be read: demo_config reports that)."""
    import yaml

    name = shipped_name(config_path)
    try:
        if name is not None:
            with shipped_config(name) as path:
                raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        return [str(task["path"]) for task in raw["tasks"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []


def generate_from(checkpoint: Path, speaker: str, prompt: str = "", *, context: Path | None = None,
                  context_turns: int | None = None, max_new_tokens: int = 40, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int = 0, warn=None) -> str:
    """A continuation of `prompt` in `speaker`'s voice from a saved phase checkpoint (the prompt not repeated),
    after the earlier turns of `context` (a speaker,text dialogue file; the last `context_turns` of them, by
    default as many as the run trained with), from the weights the checkpoint's router gives that speaker."""
    from cltune.serving.chat import Sampling, Talker, read_context

    talker = Talker(checkpoint, context_turns)
    history = read_context(talker, context) if context is not None else []
    if history and talker.context_turns == 0 and warn is not None:
        warn(f"{checkpoint} was trained without context turns (data.context_turns: 0): {context} is not shown to the "
             "model; pass --context-turns N to show it the last N turns anyway")
    return talker.reply(history, talker.token(speaker), prompt, Sampling(max_new_tokens, temperature, top_p, seed))


def chat_with(checkpoint: Path, speaker: str, user: str | None = None, *, script: Path | None = None, console,
              context_turns: int | None = None, max_new_tokens: int = 60, temperature: float = 0.8,
              top_p: float = 0.95, seed: int = 0) -> list[tuple[str, str]]:
    """A conversation with `speaker` from a saved checkpoint, printed to `console`: the lines of `script`
    ("-": standard input) or, without one, typed at the console's prompt."""
    import sys

    from cltune.serving.chat import HELP, Sampling, Talker, chat

    talker = Talker(checkpoint, context_turns)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    if script is None:
        console.print(f"talking to {talker.name(talker.token(speaker))} ({checkpoint}); {HELP}", markup=False)
        return chat(talker, speaker, user, None, console, sampling=sampling, ask=lambda label: console.input(label))
    if str(script) == "-":
        return chat(talker, speaker, user, sys.stdin, console, sampling=sampling)
    try:
        lines = script.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{script}: cannot read the script ({type(err).__name__}); pass a UTF-8 text file, one turn "
                        "per line") from None
    return chat(talker, speaker, user, lines, console, sampling=sampling)


def explore(files: Sequence[Path], out: Path, *, max_len: int = 100, model: str | None = None,
            whitespace: bool = False, speaker_col: str | None = None, text_col: str | None = None,
            conversation_col: str | None = None, drop_missing: bool = False, warn=None) -> dict:
    """EDA of dialogue files into `out` (eda.md, eda.json, plots); returns the summary.

    Token lengths use the model's tokenizer (the bundled one by default); without one, whitespace
    words, with a warning through `warn`.
    """
    from cltune.data import load_dialogue
    from cltune.data.eda import TokenCounter, summarize, write_eda
    from cltune.storage.files import writable_folder

    warn = warn or (lambda message: None)
    writable_folder(out, "EDA")
    datasets = [load_dialogue(f, speaker_col=speaker_col, text_col=text_col, conversation_col=conversation_col,
                              drop_missing=drop_missing) for f in files]
    for dataset in datasets:
        for note in dataset.report.warnings():
            warn(f"{dataset.path}: {note}")
    count, unit = None, "whitespace words"
    if not whitespace:
        try:
            from cltune.config import ModelSettings
            from cltune.modeling.model import load_tokenizer

            settings = ModelSettings(name=model) if model else ModelSettings()
            tokenizer = load_tokenizer(settings)
            count, unit = TokenCounter(tokenizer), f"{settings.name} tokenizer"
        except UserError as err:
            warn(f"no tokenizer ({err}); counting whitespace words")
    return write_eda([summarize(d, count, max_len) for d in datasets], out, unit, max_len)
