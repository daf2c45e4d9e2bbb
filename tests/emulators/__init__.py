"""In-process emulators of the external servers Ays talks to (test-only, never shipped).

Each emulator speaks the real wire protocol of the server it stands for, so tests drive it
through the real client library. See each module's docstring for what is emulated, the
sources it follows and where it deviates.
"""
