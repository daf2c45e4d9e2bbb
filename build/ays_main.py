"""Entry script of the frozen bundle: one program, called as installConfig, aysManager or
aysNode (links to it); `multicall_main` picks by the name it was called by."""

from ays_installer.cli import multicall_main

multicall_main()
