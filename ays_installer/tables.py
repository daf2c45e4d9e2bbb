"""Human output of the command line: tables whose columns fit the terminal, times in this
host's time zone. (Scripts use `--json`.)

A table is as wide as its cells when they fit; on a terminal narrower than that, the columns
named flexible (free text: names, commands, messages) give up width, widest first, down to a
floor, and their cells end in "…". Output that goes to no terminal (a pipe, a file) is not cut
unless COLUMNS says how wide it may be.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import typer

GAP = "  "
MIN_FLEX = 8  # a flexible column keeps at least this many characters (or its header's)
ELLIPSIS = "…"


def output_width() -> int | None:
    """The width to fit: the terminal's (or COLUMNS), None when not writing to a terminal."""
    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    flexible: Sequence[str] = (),
    width: int | None = None,
) -> list[str]:
    """The table's lines: a header, then one line per row, columns left-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    if width is not None:
        _fit(widths, [h in flexible for h in headers], headers, width)
    lines = [_line(headers, widths)]
    lines += [_line(row, widths) for row in cells]
    return lines


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], flexible: Sequence[str] = ()
) -> None:
    for line in render(headers, rows, flexible, output_width()):
        typer.echo(line)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())  # one line: newlines and tabs become spaces


def _fit(widths: list[int], flexible: list[bool], headers: Sequence[str], width: int) -> None:
    floors = [max(len(h), MIN_FLEX) for h in headers]
    excess = sum(widths) + len(GAP) * (len(widths) - 1) - width
    while excess > 0:
        candidates = [i for i, flex in enumerate(flexible) if flex and widths[i] > floors[i]]
        if not candidates:
            return  # as narrow as it gets; the terminal wraps the rest
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1


def _line(values: Sequence[str], widths: Sequence[int]) -> str:
    parts = []
    for value, size in zip(values, widths, strict=True):
        if len(value) > size:
            value = value[: size - 1] + ELLIPSIS
        parts.append(value.ljust(size))
    return GAP.join(parts).rstrip()


def local_time(stamp: str | None) -> str | None:
    """An API datetime (naive UTC, ISO 8601) in this host's time zone, to the second."""
    if not stamp:
        return None
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fields(pairs: Sequence[tuple[str, object]]) -> None:
    """`name: value` lines, the values aligned."""
    size = max(len(name) for name, _ in pairs) + 1
    for name, value in pairs:
        typer.echo(f"{(name + ':').ljust(size)} {_cell(value) if value != '' else ''}".rstrip())
