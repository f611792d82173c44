"""The `cltune` command line: demo-data, eda, train, run, sweep, report, generate, strategies, demo."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cltune.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual LoRA fine-tuning of causal LMs on a sequence of dialogue styles.")
console = Console()
err_console = Console(stderr=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`", category=UserWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


@app.command("demo-data")
def demo_data(out: Path = typer.Option(Path("data"), help="folder for host_guest_{a,b,c}.csv"),
              seed: int = typer.Option(0, help="seed for the sample of conversations")) -> None:
    """Write the demo corpus (one host, three guests) from the chitchat-dataset package."""
    from cltune.data.demo import write_demo_corpus

    for path in write_demo_corpus(out, seed=seed):
        console.print(f"wrote {path}")


@app.command()
def eda(files: list[Path] = typer.Argument(..., help="CSV/JSONL dialogue files"),
        out: Path = typer.Option(Path("eda"), help="output folder"),
        max_len: int = typer.Option(100, help="token length to report the share under"),
        model: Optional[str] = typer.Option(None, help="tokenizer for token lengths (default: the bundled model's)"),
        whitespace: bool = typer.Option(False, help="count whitespace words instead of model tokens"),
        speaker_col: Optional[str] = typer.Option(None), text_col: Optional[str] = typer.Option(None)) -> None:
    """Explore datasets: counts, speaker balance, lengths, missing values, vocabulary."""
    from cltune.data import load_dialogue
    from cltune.data.eda import summarize, write_eda
    from cltune.report.tables import eda_table

    datasets = [load_dialogue(f, speaker_col=speaker_col, text_col=text_col) for f in files]
    for d in datasets:
        for note in d.report.warnings():
            err_console.print(f"warning: {d.path}: {note}")
    count, name = None, "whitespace words"
    if not whitespace:
        try:
            from cltune.config import ModelSettings
            from cltune.model import load_tokenizer

            settings = ModelSettings(name=model) if model else ModelSettings()
            tokenizer = load_tokenizer(settings)
            count, name = (lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])), f"{settings.name} tokenizer"
        except UserError as err:
            err_console.print(f"warning: no tokenizer ({err}); counting whitespace words")
    summary = write_eda([summarize(d, count, max_len) for d in datasets], out, name, max_len)
    console.print(eda_table(summary))
    console.print(f"EDA written to {out / 'eda.md'}")


def _config(config: Optional[Path], sets: list[str], base: dict | None = None):
    from cltune.config import build_config, load_config

    if config is not None:
        return load_config(config, sets)
    return build_config(base or {}, sets, source="command line")


@app.command()
def run(config: Path = typer.Argument(..., help="run config (YAML)"),
        set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set phase2.epochs=2 --set ewc.lambda=20"),
        overwrite: bool = typer.Option(False, help="replace an existing run folder"),
        resume: bool = typer.Option(False, help="continue the run in the run folder from its last complete checkpoint "
                                    "(same config and data; finished phases are not retrained)")) -> None:
    """Run a whole continual-learning stream from a config (or continue one with --resume)."""
    from cltune.report import print_summary, write_report

    cfg = _config(config, set_)
    _check_run_dir(cfg.run_dir, overwrite, resume=resume)
    from cltune.pipeline import run as run_stream

    metrics = run_stream(cfg, console=console, resume=resume)
    if _is_main():
        write_report(cfg.run_dir)
        print_summary(console, metrics)
        console.print(f"report: {cfg.run_dir / 'report.md'} and {cfg.run_dir / 'report.html'}")


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _check_run_dir(run_dir: Path, overwrite: bool, resume: bool | None = None) -> None:
    """A folder holding a run is replaced only with --overwrite (`resume=None`: the command has no --resume)."""
    from cltune.resume import check_run_dir

    check_run_dir(run_dir, overwrite, resume=bool(resume), resumable=resume is not None)


@app.command()
def train(data: Path = typer.Option(..., help="dialogue CSV/JSONL"),
          out: Path = typer.Option(..., help="checkpoint folder to write"),
          model: Optional[str] = typer.Option(None, help="bundled name, local model folder or cached hub id"),
          config: Optional[Path] = typer.Option(None, help="YAML with model/lora/data/train settings"),
          set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set train.epochs=1"),
          overwrite: bool = typer.Option(False, help="replace an existing checkpoint folder")) -> None:
    """Phase 1 alone: LoRA fine-tuning on one dataset, with before/after perplexity."""
    from cltune.config import build_config, load_config

    sets = [*set_, f"tasks=[{{path: '{data}'}}]", "strategy=naive", f"output_dir='{out.parent}'", f"name='{out.name}'"]
    if model:
        sets.append(f"model.name='{model}'")
    cfg = load_config(config, sets) if config else build_config({}, sets, source="command line")
    _check_run_dir(cfg.run_dir, overwrite)
    from cltune.pipeline import run as run_stream

    metrics = run_stream(cfg, console=console)
    phase = metrics["phases"][0]
    console.print(f"test PPL {phase['before']['test_ppl']:.2f} → {phase['after']['test_ppl']:.2f} "
                  f"({phase['wall_s']:.0f} s, {phase['tokens_per_s']:.0f} tok/s); checkpoint: {out / 'phase1'}")


@app.command()
def generate(checkpoint: Path = typer.Argument(..., help="a phase folder, e.g. checkpoints/demo/phase2"),
             speaker: str = typer.Option(..., help='speaker name (e.g. "Lee Cronin") or token (e.g. "<LEE>")'),
             prompt: str = typer.Option("", help="text to continue after the speaker token"),
             max_new_tokens: int = typer.Option(40), temperature: float = typer.Option(0.8),
             top_p: float = typer.Option(0.95), seed: int = typer.Option(0)) -> None:
    """Sample what a speaker would say, from a saved checkpoint."""
    from cltune.checkpoint import load_checkpoint
    from cltune.data.speakers import speaker_key
    from cltune.generate import generate_text

    model, tokenizer, meta = load_checkpoint(checkpoint)
    tokens = meta.get("speaker_tokens", {})
    by_key = {speaker_key(k): v for k, v in tokens.items()}
    token = speaker if speaker in tokens.values() else by_key.get(speaker_key(speaker))
    if token is None:
        raise UserError(f"{checkpoint}: unknown speaker {speaker!r}; known: {', '.join(f'{k} {v}' for k, v in tokens.items())}")
    from cltune.checkpoint import load_strategy_state
    from cltune.strategies.adapters import adapter_for_token

    routed = adapter_for_token(load_strategy_state(checkpoint), tokenizer.convert_tokens_to_ids(token))
    if routed:  # per-task adapters: the speaker's own task adapter speaks
        model.set_adapter(routed)
    console.print(generate_text(model, tokenizer, token, prompt, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder holding metrics.json")) -> None:
    """Rebuild report.md and report.html from a run's metrics.json and logs."""
    from cltune.report import write_report

    md, html = write_report(run_dir)
    console.print(f"wrote {md} and {html}")


@app.command("config-reference")
def config_reference(readme: Optional[Path] = typer.Option(None, help="rewrite this README's reference block instead")) -> None:
    """Print the config reference (Markdown) generated from the config models."""
    from cltune.files import atomic_write_text
    from cltune.reference import config_reference as reference, readme_with_reference

    if readme is None:
        print(reference())
    else:
        atomic_write_text(readme, readme_with_reference(readme.read_text(encoding="utf-8")))


@app.command()
def strategies() -> None:
    """List the registered continual-learning strategies."""
    from cltune.strategies import REGISTRY

    for name, cls in REGISTRY.items():
        console.print(f"[bold]{name}[/]: {cls.summary}")


@app.command()
def sweep(config: Path = typer.Argument(..., help="run config (YAML)"),
          grid: list[str] = typer.Option(..., "--grid", help="KEY=V1,V2,... e.g. --grid ewc.lambda=0,10,20"),
          set_: list[str] = typer.Option([], "--set", help="fixed override for every point"),
          out: Optional[Path] = typer.Option(None, help="sweep folder (default: output_dir/name-sweep)")) -> None:
    """Run a grid of configs (the seed's ablations), reusing phase-1 checkpoints where settings allow."""
    from cltune.sweep import run_sweep

    md = run_sweep(config, grid, set_, out, console=console)
    console.print(f"sweep: {md}")


@app.command()
def demo(out: Path = typer.Option(Path("checkpoints"), help="where runs go"),
         data: Path = typer.Option(Path("data"), help="where the demo CSVs go"),
         config: Path = typer.Option(Path("configs/demo.yaml"), help="the demo run config")) -> None:
    """The main job: demo corpus → EDA → phase 1 → phase 2 (ewc_replay) → evaluation → report."""
    from cltune.data.demo import write_demo_corpus

    write_demo_corpus(data)
    run(config, [f"output_dir='{out}'"], overwrite=True)


def main() -> None:
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except UserError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(130)
        from cltune.train import DivergedError

        if isinstance(err, DivergedError):
            err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(3)
        raise
