"""The `cltune` command line: demo-data, eda, init, train, run, sweep, compare, report, generate, chat, export,
strategies, demo, config-reference. Each command parses its arguments and calls one plain function (`cltune.api`
and friends)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console

from cltune import api
from cltune.errors import DivergedError, UserError, WriteError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual LoRA fine-tuning of causal LMs on a sequence of dialogue styles.")
console = Console(soft_wrap=True)  # paths stay whole when the output is piped or captured
err_console = Console(stderr=True, soft_wrap=True)


def user_path(value: str | Path) -> Path:
    """A path as the user meant it: `~` is their home folder even where no shell expanded it (--out=~/runs)."""
    return Path(value).expanduser()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`", category=UserWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def _column_option(role: str, example: str, detected: str):
    return typer.Option(None, f"--{role}-col",
                        help=f"the {role} column, e.g. {example} (default: detected: {detected})")


def speaker_col_option():
    return _column_option("speaker", "who", "speaker, name, role, ...")


def text_col_option():
    return _column_option("text", "line", "text, utterance, message, ...")


def conversation_col_option():
    return _column_option("conversation", "episode",
                          "conversation, dialogue_id, episode, ...; none: split by utterance")


def drop_missing_option():
    return typer.Option(False, "--drop-missing", help="drop rows with missing text instead of stopping at the first")


@app.command("demo-data")
def demo_data(out: Path = typer.Option(Path("data"), parser=user_path, help="folder for host_guest_{a,b,c,…}.csv"),
              seed: int = typer.Option(0, help="seed for the sample of conversations"),
              guests: int = typer.Option(3, help="how many guests of the host: A, B, C, then the host's other "
                                         "partners by turns (up to 400 turns each; the podcast config reads 6)"),
              ) -> None:
    """Write the demo corpus (one host, three guests or --guests N) from the chitchat-dataset package."""
    from cltune.data.demo import write_demo_corpus

    for path in write_demo_corpus(out, seed=seed, guests=guests):
        console.print(f"wrote {path}")


@app.command()
def eda(files: list[Path] = typer.Argument(..., parser=user_path, help="CSV/JSONL dialogue files"),
        out: Path = typer.Option(Path("eda"), parser=user_path, help="output folder"),
        max_len: int = typer.Option(100, help="token length to report the share under"),
        model: str | None = typer.Option(None, help="tokenizer for token lengths (default: the bundled model's)"),
        whitespace: bool = typer.Option(False, help="count whitespace words instead of model tokens"),
        speaker_col: str | None = speaker_col_option(), text_col: str | None = text_col_option(),
        conversation_col: str | None = conversation_col_option(), drop_missing: bool = drop_missing_option()) -> None:
    """Explore datasets: counts, speaker balance, lengths, missing values, vocabulary."""
    from cltune.report.tables import eda_table

    summary = api.explore(files, out, max_len=max_len, model=model, whitespace=whitespace, speaker_col=speaker_col,
                          text_col=text_col, conversation_col=conversation_col, drop_missing=drop_missing,
                          warn=lambda note: err_console.print(f"warning: {note}"))
    console.print(eda_table(summary))
    console.print(f"EDA written to {out / 'eda.md'}")


SET_HELP = "override a config key, e.g. --set phase2.epochs=2 --set ewc.lambda=20"
LOG_WITH_HELP = "log to an experiment tracker: tensorboard (under RUN/logs), wandb or mlflow; repeat for several"


@app.command()
def init(files: list[Path] = typer.Argument(..., parser=user_path, help="your dialogue files (CSV/JSONL/Parquet), in "
                                           "the order to learn them"),
         out: Path = typer.Option(Path("cltune.yaml"), parser=user_path, help="the config file to write"),
         name: str | None = typer.Option(None, help="run name: the run folder is checkpoints/NAME (default: the "
                                         "config file's name)"),
         strategy: str | None = typer.Option(None, help="continual-learning strategy (default: progressive; see "
                                             "`cltune strategies`)"),
         model: str | None = typer.Option(None, help="base model: bundled name or local model folder (default: the "
                                          "bundled SmolLM2-135M-Instruct)"),
         overwrite: bool = typer.Option(False, help="replace an existing config file"),
         drop_missing: bool = drop_missing_option(),
         speaker_col: str | None = speaker_col_option(), text_col: str | None = text_col_option(),
         conversation_col: str | None = conversation_col_option()) -> None:
    """Write a commented starter config for your own dialogue files, and print the command that runs it."""
    import shlex

    starter = api.init_config(files, out, name=name, strategy=strategy, model=model, overwrite=overwrite,
                              columns=api.column_settings(speaker_col, text_col, conversation_col),
                              drop_missing=drop_missing,
                              warn=lambda note: err_console.print(f"warning: {note}", markup=False))
    config = starter.config
    for spec in config.tasks:
        console.print(f"task {spec.name}: {spec.path}", markup=False, highlight=False)
    console.print(f"wrote {out} (strategy {config.strategy}, {len(config.tasks)} tasks); run it with:", markup=False)
    console.print(f"  cltune run {shlex.quote(str(out))}", markup=False, highlight=False)
    console.print(f"then open {config.run_dir / 'report.html'}", markup=False, highlight=False)


@app.command()
def run(config: Path = typer.Argument(..., parser=user_path, help="run config (YAML)"),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
        overwrite: bool = typer.Option(False, help="replace an existing run folder"),
        resume: bool = typer.Option(False, help="continue the run in the run folder from its last complete checkpoint "
                                    "(same config and data; finished phases are not retrained)"),
        phase1_from: Path | None = typer.Option(None, parser=user_path,
                                                help="take phase 1 from a finished run's phase1 folder with the "
                                                "same model, LoRA, data, seed and phase-1 settings instead of "
                                                "training it"),
        log_with: list[str] = typer.Option([], "--log-with", help=LOG_WITH_HELP),
        speaker_col: str | None = speaker_col_option(), text_col: str | None = text_col_option(),
        conversation_col: str | None = conversation_col_option()) -> None:
    """Run a whole continual-learning stream from a config (or continue one with --resume)."""
    columns = api.column_settings(speaker_col, text_col, conversation_col)
    api.run_config(api.with_columns(api.config_from(config, set_), columns), overwrite=overwrite, resume=resume,
                   console=console, phase1_from=phase1_from, log_with=log_with)


@app.command()
def train(data: Path = typer.Option(..., parser=user_path, help="dialogue CSV/JSONL"),
          out: Path = typer.Option(..., parser=user_path, help="checkpoint folder to write"),
          model: str | None = typer.Option(None, help="bundled name, local model folder or cached hub id"),
          config: Path | None = typer.Option(None, parser=user_path, help="YAML with model/lora/data/train settings"),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
          overwrite: bool = typer.Option(False, help="replace an existing checkpoint folder"),
          resume: bool = typer.Option(False, help="continue a stopped training in --out from its last step checkpoint"),
          log_with: list[str] = typer.Option([], "--log-with", help=LOG_WITH_HELP),
          speaker_col: str | None = speaker_col_option(), text_col: str | None = text_col_option(),
          conversation_col: str | None = conversation_col_option()) -> None:
    """Phase 1 alone: LoRA fine-tuning on one dataset, with before/after perplexity."""
    metrics = api.train_single(data, out, model=model, config_path=config, sets=set_, overwrite=overwrite,
                               resume=resume, console=console, log_with=log_with,
                               columns=api.column_settings(speaker_col, text_col, conversation_col))
    phase = metrics.phases[0]
    console.print(f"test PPL {phase.before['test_ppl']:.2f} → {phase.after['test_ppl']:.2f} "
                  f"({phase.wall_s:.0f} s, {phase.tokens_per_s:.0f} tok/s); checkpoint: {out / 'phase1'}")


CONTEXT_TURNS_HELP = ("earlier turns shown before the reply (default: as many as the run trained with, "
                      "data.context_turns)")


@app.command()
def generate(checkpoint: Path = typer.Argument(..., parser=user_path,
                                               help="a phase folder, e.g. checkpoints/demo/phase2"),
             speaker: str = typer.Option(..., help='speaker name (e.g. "Lee Cronin") or token (e.g. "<LEE>")'),
             prompt: str = typer.Option("", help="text to continue after the speaker token"),
             context: Path | None = typer.Option(None, parser=user_path,
                                                 help="earlier turns of the conversation: a CSV/JSONL file of "
                                                 "speaker,text rows, oldest first"),
             context_turns: int | None = typer.Option(None, min=0, help=CONTEXT_TURNS_HELP),
             max_new_tokens: int = typer.Option(40), temperature: float = typer.Option(0.8),
             top_p: float = typer.Option(0.95), seed: int = typer.Option(0)) -> None:
    """Sample what a speaker would say (next, after --context), from a saved checkpoint."""
    console.print(api.generate_from(checkpoint, speaker, prompt, context=context, context_turns=context_turns,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                    warn=lambda note: err_console.print(f"warning: {note}", markup=False)),
                  markup=False, highlight=False)


@app.command()
def chat(checkpoint: Path = typer.Argument(..., parser=user_path, help="a phase folder, e.g. checkpoints/demo/phase2"),
         as_: str = typer.Option(..., "--as", help='the speaker the model plays, e.g. "Guest A"'),
         user: str | None = typer.Option(None, help="the speaker you play (default: who that speaker talks with in "
                                         "the training data)"),
         script: Path | None = typer.Option(None, parser=user_path,
                                            help="read your turns (and /commands) from this file, one per line, "
                                            "instead of typing them; - reads standard input"),
         context_turns: int | None = typer.Option(None, min=0, help=CONTEXT_TURNS_HELP),
         max_new_tokens: int = typer.Option(60), temperature: float = typer.Option(0.8),
         top_p: float = typer.Option(0.95), seed: int = typer.Option(0)) -> None:
    """Talk with a speaker of a saved checkpoint: /reset, /speaker NAME, /quit."""
    api.chat_with(checkpoint, as_, user, script=script, console=console, context_turns=context_turns,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


@app.command()
def export(checkpoint: Path = typer.Argument(..., parser=user_path,
                                             help="a phase folder, e.g. checkpoints/demo/phase2"),
           out: Path = typer.Option(..., parser=user_path, help="folder to write (new, empty, or an earlier export)"),
           speaker: str | None = typer.Option(None, help="per-task strategies: export the weights this speaker is "
                                              "served by (default: one folder per dataset)"),
           adapter: bool = typer.Option(False, "--adapter", help="a PEFT adapter folder instead of a merged model"),
           gguf: str | None = typer.Option(None, help="a GGUF file of the merged model instead: f16 or q8_0 "
                                           "(llama.cpp, Ollama, LM Studio)")) -> None:
    """Export a checkpoint as a Hugging Face model folder (LoRA merged, speaker tokens in the tokenizer), a PEFT
    adapter, or a GGUF file."""
    from cltune.serving.export import export_checkpoint

    for folder in export_checkpoint(checkpoint, out, speaker=speaker, adapter=adapter, gguf=gguf):
        console.print(f"wrote {folder}", markup=False, highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., parser=user_path, help="a run folder holding metrics.json")) -> None:
    """Rebuild report.md and report.html from a run's metrics.json and logs."""
    from cltune.report import write_report

    md, html = write_report(run_dir)
    console.print(f"wrote {md} and {html}")


@app.command("config-reference")
def config_reference() -> None:
    """Print the config reference (Markdown): every key with its type, default and meaning."""
    from cltune.studies.reference import config_reference as reference

    print(reference())


@app.command()
def strategies() -> None:
    """List the registered continual-learning strategies."""
    from cltune.strategies import REGISTRY

    for name, cls in REGISTRY.items():
        console.print(f"[bold]{name}[/]: {cls.summary}")


RAY_HELP = ("run the runs side by side as Ray tasks: --ray alone starts a Ray on this machine for the command; "
            "--ray auto or ray://host:port joins a running cluster (pip install 'cltune\\[ray]')")
RUN_CPUS_HELP = "with --ray: CPUs (and torch threads) per run; default 4, or all of a smaller machine"
RUN_GPUS_HELP = "with --ray: GPUs per run, fractions allowed; default 1 where the cluster has GPUs"
RETRIES_HELP = ("with --ray: times a run whose worker died (a lost node, a killed process) is resumed from its last "
                "step checkpoint on another; default 1")


@app.command()
def sweep(config: Path = typer.Argument(..., parser=user_path, help="run config (YAML)"),
          grid: list[str] = typer.Option(..., "--grid", help="KEY=V1,V2,... e.g. --grid ewc.lambda=0,10,20"),
          set_: list[str] = typer.Option([], "--set", help="fixed override for every point"),
          out: Path | None = typer.Option(None, parser=user_path,
                                          help="sweep folder (default: output_dir/name-sweep)"),
          ray: str | None = typer.Option(None, "--ray", metavar="[ADDRESS]", help=RAY_HELP),
          run_cpus: float | None = typer.Option(None, help=RUN_CPUS_HELP),
          run_gpus: float | None = typer.Option(None, help=RUN_GPUS_HELP),
          retries: int | None = typer.Option(None, help=RETRIES_HELP)) -> None:
    """Run a grid of configs (ablations such as the reference pipeline's), reusing phase-1 checkpoints where
    settings allow."""
    from cltune.studies.scale_out import ray_options
    from cltune.studies.sweep import run_sweep

    md = run_sweep(config, grid, set_, out, console=console, ray=ray_options(ray, run_cpus, run_gpus, retries))
    console.print(f"sweep: {md}")


@app.command()
def compare(config: Path = typer.Argument(..., parser=user_path,
                                          help="run config (YAML): the stream and budget every strategy gets"),
            strategies: str = typer.Option(...,
                                           help="comma-separated strategy names; naive always runs as the reference"),
            seeds: int = typer.Option(3, help="seeds per strategy (each reseeds split, sampling and initialization)"),
            set_: list[str] = typer.Option([], "--set", help="fixed override for every run"),
            out: Path | None = typer.Option(None, parser=user_path,
                                            help="compare folder (default: output_dir/compare)"),
            bootstrap: int = typer.Option(1000, help="bootstrap resamples of the test utterances"),
            ray: str | None = typer.Option(None, "--ray", metavar="[ADDRESS]", help=RAY_HELP),
            run_cpus: float | None = typer.Option(None, help=RUN_CPUS_HELP),
            run_gpus: float | None = typer.Option(None, help=RUN_GPUS_HELP),
            retries: int | None = typer.Option(None, help=RETRIES_HELP)) -> None:
    """Compare strategies on one stream over several seeds: intervals, paired differences against naive, costs."""
    from cltune.studies.compare import run_compare
    from cltune.studies.scale_out import ray_options

    md = run_compare(config, [s.strip() for s in strategies.split(",") if s.strip()], seeds, set_, out, bootstrap,
                     console=console, ray=ray_options(ray, run_cpus, run_gpus, retries))
    console.print(f"compare: {md} and {md.with_suffix('.html')}")


@app.command()
def demo(out: Path = typer.Option(Path("checkpoints"), parser=user_path, help="where runs go"),
         data: Path = typer.Option(Path("data"), parser=user_path,
                                   help="where the demo CSVs go; the config's task files are read from here"),
         config: Path | None = typer.Option(None, parser=user_path, help="a run config to use instead of the shipped "
                                            "demo config (its task files are read by name from --data), or a shipped "
                                            "one by name: podcast (the host and six guests)"),
         set_: list[str] = typer.Option([], "--set", help=SET_HELP),
         resume: bool = typer.Option(False, help="continue a stopped demo run instead of starting it over"),
         log_with: list[str] = typer.Option([], "--log-with", help=LOG_WITH_HELP)) -> None:
    """The main job: demo corpus → EDA → phase 1 → phase 2 (ewc_replay) → evaluation → report."""
    api.run_demo(out, data, config, set_, console=console, log_with=log_with, resume=resume)


RESUMABLE = {"run", "train", "demo"}  # commands that continue a stopped run with --resume


def _resume_hint() -> str:
    """How to continue the command that just stopped: the same arguments, --resume instead of --overwrite."""
    import shlex

    args = sys.argv[1:]
    if args and args[0] in ("compare", "sweep"):
        return (f"; continue with: {shlex.join(['cltune', *args])} (the same command: finished runs are reused, "
                "stopped ones resume)")
    if not args or args[0] not in RESUMABLE:
        return ""
    args = [a for a in args if a != "--overwrite"] + ([] if "--resume" in args else ["--resume"])
    return f"; continue with: {shlex.join(['cltune', *args])}"


def _fail(message: str, code: int) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def _usage_errors() -> tuple[type[Exception], ...]:
    """What a usage error (unknown command or option, bad value, missing argument) is raised as: Click's
    exceptions and, from Typer 0.29 on, Typer's own vendored copies, which do not subclass Click's."""
    import click

    return (click.exceptions.ClickException, *_typer_exceptions("TyperException"))


def _aborts() -> tuple[type[BaseException], ...]:
    """End of input at a prompt, as Click and Typer raise it."""
    import click

    return (click.exceptions.Abort, *_typer_exceptions("Abort"))


def _typer_exceptions(name: str) -> tuple[type[BaseException], ...]:
    import typer

    found = getattr(getattr(typer, "exceptions", None), name, None)
    return (found,) if isinstance(found, type) else ()


# Options whose value may be left out, and what they mean then (`--ray` alone: a Ray started for the command).
OPTIONAL_VALUES = {"--ray": "local"}


def with_optional_values(argv: list[str]) -> list[str]:
    """`argv` with the implied value after an option of OPTIONAL_VALUES given without one (Click needs a value):
    at the end, before another option, or before what is plainly a config file rather than an address."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in OPTIONAL_VALUES:
            after = argv[i + 1] if i + 1 < len(argv) else None
            if after is None or after.startswith("-") or Path(after).suffix in (".yaml", ".yml") \
                    or Path(after).is_file():
                out.append(OPTIONAL_VALUES[arg])
    return out


def main() -> None:

    from cltune.training import interrupt

    _quiet_libraries()
    try:
        with interrupt.handlers():
            # Typer returns an exit code instead of raising Exit here
            code = app(args=with_optional_values(sys.argv[1:]), prog_name="cltune", standalone_mode=False)
        if code == 130:  # Typer's own mapping of a KeyboardInterrupt: Ctrl-C outside the training loop
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except WriteError as err:
        _fail(f"{err}{_resume_hint()}", 2)
    except UserError as err:
        _fail(str(err), 2)
    except interrupt.Interrupted as err:
        _fail(f"{err}{_resume_hint()}", err.exit_code)
    except (KeyboardInterrupt, *_aborts()):  # Ctrl-C outside the training loop (Abort: end of input)
        stop = interrupt.Interrupted(signal.SIGINT)
        _fail(f"{stop}{_resume_hint()}", stop.exit_code)
    except _usage_errors() as err:  # usage errors arrive here in non-standalone mode
        err.show()
        if getattr(err, "ctx", None) is None and err.exit_code == 2:  # Click had no usage line to show: point at help
            command = next((a for a in sys.argv[1:2] if not a.startswith("-")), "")
            err_console.print(f"Try '{' '.join(['cltune', command, '--help'] if command else ['cltune', '--help'])}' "
                              "for help.", markup=False, highlight=False)
        sys.exit(err.exit_code)
    except DivergedError as err:
        _fail(str(err), 3)
    except OSError as err:  # what the environment refuses (a full disk, permissions) that no check caught first
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}{_resume_hint()}", 2)
