"""`aysNode`: the executor node's commands."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Ays executor node.")


@app.command()
def version() -> None:
    """Print the version."""
    from ays_runtime import __version__

    typer.echo(__version__)
