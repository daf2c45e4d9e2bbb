"""Talking to systemd without a library: sd_notify is one datagram to $NOTIFY_SOCKET.

The units (templates/systemd/) are `Type=notify` with `NotifyAccess=main`, which systemd 252
(Debian 12, RHEL 9) supports; `Type=notify-reload` does not exist there. So:

    start     the main process sends READY=1 once it serves
    reload    the main process sends RELOADING=1 when it starts a reload; once the new
              process serves, MAINPID=<new pid> and READY=1 in one datagram (only the main
              process may speak, so the old one announces its successor); a failed reload
              sends READY=1 with a STATUS= saying why, and the old process goes on as main
    stop      STOPPING=1
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("ays.service")

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "MAINPID=42", ...) to the service manager, one datagram.
    False, and nothing sent, when the process does not run under systemd."""
    address = os.environ.get(NOTIFY_SOCKET, "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("%s=%r: not a unix socket path; not notifying", NOTIFY_SOCKET, address)
        return False
    message = "\n".join(fields).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as err:
        log.warning("cannot notify the service manager at %s: %s", address, err)
        return False
    return True


def monotonic_usec() -> str:
    """The MONOTONIC_USEC= field systemd 253+ wants with RELOADING=1 (older ones ignore it)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def booted() -> bool:
    """Whether systemd is the init system (sd_booted(3): /run/systemd/system exists)."""
    return Path("/run/systemd/system").is_dir()
