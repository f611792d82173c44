"""mkdocs hook: fills the reference pages from the code at build time, so nothing committed can drift from it.

A page's `<!-- config-reference -->` becomes every config key (from the typed config models, through
`cltune.studies.reference.config_reference`), and `<!-- cli-reference -->` every command and option of the Typer app
`cltune.cli:app`, read through `typer.main.get_command` as the CLI itself parses them.
"""

from __future__ import annotations

import inspect

CONFIG_MARKER = "<!-- config-reference -->"
CLI_MARKER = "<!-- cli-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CONFIG_MARKER in markdown:
        from cltune.studies.reference import config_reference

        markdown = markdown.replace(CONFIG_MARKER, config_reference(level=2))
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def cli_reference() -> str:
    """One section per command: its usage line, its help, and a table of its arguments and options."""
    import typer.main

    from cltune.cli import app

    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="cltune")
    lines = []
    for name, command in group.commands.items():
        ctx = command.context_class(command, info_name=name, parent=root)
        lines += [f"## `cltune {name}`", "", "```text", _usage(name, command), "```", "",
                  " ".join(inspect.cleandoc(command.help or "").split()), "",
                  "| argument or option | meaning |", "|---|---|"]
        for param in command.params:
            record = param.get_help_record(ctx)  # (option names with their type, help with default and range)
            if record is not None:
                lines.append(f"| `{record[0]}` | {_cell(record[1])} |")
        lines.append("")
    return "\n".join(lines)


def _usage(name: str, command) -> str:
    words = ["cltune", name, "[OPTIONS]"]
    for param in command.params:
        if param.param_type_name == "argument":
            word = param.name.upper() + (" ..." if param.nargs == -1 else "")
            words.append(word if param.required else f"[{word}]")
    return " ".join(words)


def _cell(text: str) -> str:
    """Help text as one Markdown table cell: a `|` in it would end the cell."""
    return " ".join(text.split()).replace("|", "\\|")
