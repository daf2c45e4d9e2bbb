"""Ays runtime: the scheduling center (manager) and the executor node daemons."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ays")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.1.0+src"
