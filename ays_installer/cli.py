"""Entry points of the three programs. A PyInstaller bundle holds one executable that is
linked under all three names; `multicall_main` dispatches on the name it was called by."""

from __future__ import annotations

import os
import sys


def install_config_main() -> None:
    from ays_installer.install_config import app

    app(prog_name="installConfig")


def manager_main() -> None:
    from ays_installer.manager_cli import app

    app(prog_name="aysManager")


def node_main() -> None:
    from ays_installer.node_cli import app

    app(prog_name="aysNode")


PROGRAMS = {
    "installConfig": install_config_main,
    "aysManager": manager_main,
    "aysNode": node_main,
}


def multicall_main() -> None:
    name = os.path.basename(sys.argv[0])
    main = PROGRAMS.get(name)
    if main is None:
        sys.exit(f"{name}: call me as one of {', '.join(PROGRAMS)} (a link to this program)")
    main()
