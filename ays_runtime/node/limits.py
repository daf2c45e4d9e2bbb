"""What a shell job can be given: the rules the executor holds a job to when it starts it,
and the manager holds a task to when it is saved (so a task that can never run is refused
there, naming the field, instead of failing at every fire).

A shell job is `execve("/bin/sh", ["/bin/sh", "-c", command], env)` in `workdir`. Linux's
execve takes no string holding a NUL byte, no single argument or environment string
("NAME=value") longer than MAX_ARG_STRLEN (32 pages: 131072 bytes with its NUL), and all of
them together within ARG_MAX (a quarter of the stack limit: 2 MiB with the usual 8 MiB). The
command and the task's env may use half of that; the rest is the node's own variables and
the AYS_* ones. Each check raises ValueError saying what is wrong, without the field name:
the caller knows which field it checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ARG_BYTES = 131_071  # one argument or environment string, its NUL not counted
EXEC_BUDGET_BYTES = 1_048_576  # the command and the task's env together
PATH_MAX_BYTES = 4095  # a workdir, its NUL not counted


def check_text(value: str) -> str:
    """Text that goes into an argument or the environment: no NUL byte."""
    if "\0" in value:
        raise ValueError("must not contain a NUL byte (exec cannot pass one)")
    return value


def check_command(command: str) -> str:
    check_text(command)
    size = len(command.encode("utf-8", "surrogateescape"))
    if size > MAX_ARG_BYTES:
        raise ValueError(
            f"{size} bytes is longer than one exec argument can be ({MAX_ARG_BYTES} bytes "
            "on Linux); put the script in a file on the node and run that"
        )
    return command


def check_env_name(name: str) -> str:
    if not ENV_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a variable name: letters, digits and _, not starting with a digit"
        )
    return name


def check_env(env: Mapping[str, str]) -> Mapping[str, str]:
    for name, value in env.items():
        check_env_name(name)
        if "\0" in value:
            raise ValueError(f"{name}: the value must not contain a NUL byte")
        size = len(f"{name}={value}".encode("utf-8", "surrogateescape"))
        if size > MAX_ARG_BYTES:
            raise ValueError(
                f"{name}: {size} bytes is longer than one environment string can be "
                f"({MAX_ARG_BYTES} bytes on Linux)"
            )
    return env


def check_exec_size(command: str, env: Mapping[str, str]) -> None:
    """The command and the env together within EXEC_BUDGET_BYTES (strings, their NULs and
    the pointers to them, as the kernel counts)."""
    strings = [command, *(f"{name}={value}" for name, value in env.items())]
    size = sum(len(s.encode("utf-8", "surrogateescape")) + 1 + 8 for s in strings)
    if size > EXEC_BUDGET_BYTES:
        raise ValueError(
            f"the command and env take {size} bytes, more than a job may pass to exec "
            f"({EXEC_BUDGET_BYTES}); put the data in a file on the node"
        )


def check_workdir(workdir: str) -> str:
    check_text(workdir)
    if not os.path.isabs(workdir):
        raise ValueError("must be an absolute path (e.g. /srv/reports)")
    if len(workdir.encode("utf-8", "surrogateescape")) > PATH_MAX_BYTES:
        raise ValueError(f"is longer than a path can be ({PATH_MAX_BYTES} bytes)")
    return workdir
