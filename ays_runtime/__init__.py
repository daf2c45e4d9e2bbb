"""Ays runtime: the scheduling center (manager) and the executor node daemons.

`AYS_VERSION_OVERRIDE`, when set, is the version this process reports (health, status, logs):
a build or a launcher stamps a program whose package metadata says otherwise.
"""

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ays")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.1.0+src"
__version__ = os.environ.get("AYS_VERSION_OVERRIDE") or __version__
