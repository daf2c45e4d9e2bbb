"""Ays installer: the `installConfig`, `aysManager` and `aysNode` command-line programs."""
