"""The built-in registry's view of the nodes, on a real database: a refresh that read the node
table just before a beat was recorded does not undo what that beat did."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import Engine, event

from ays_runtime.config import BuiltinRegistrySettings
from ays_runtime.protocol import Heartbeat
from ays_runtime.registry.builtin import BuiltinRegistry
from tests.test_scheduler import MANAGER

NODE = Heartbeat(ip="127.0.0.1", port=19999, node_group="g")


@pytest.mark.parametrize(
    ("beat", "routed"),
    [("online", [NODE.ip]), ("leaving", [])],
    ids=["node-just-online-is-routed", "leaving-node-is-not-routed"],
)
def test_a_refresh_that_read_the_nodes_before_a_beat_keeps_what_the_beat_changed(
    engine: Engine, beat: str, routed: list[str]
) -> None:
    registry = BuiltinRegistry(
        engine, BuiltinRegistrySettings(backend="builtin", heartbeat_interval=5), MANAGER
    )
    if beat == "leaving":
        registry.record_heartbeat(NODE)  # online before the refresh reads the table
    armed = [True]

    def beat_once_the_read_is_done(*_: Any) -> None:
        # The refresh's read is over (its connection goes back to the pool) and it has not
        # yet replaced the view: the node's beat is recorded in that gap.
        if armed:
            armed.clear()
            registry.record_heartbeat(NODE.model_copy(update={"state": beat}))

    async def refresh() -> list[str]:
        event.listen(engine, "checkin", beat_once_the_read_is_done)
        try:
            await registry.start()  # its first refresh, before the refreshing loop runs
        finally:
            event.remove(engine, "checkin", beat_once_the_read_is_done)
        try:
            assert not armed, "the beat was not recorded during the refresh"
            return [n.ip for n in registry.healthy_nodes("g")]
        finally:
            await registry.stop()

    assert asyncio.run(refresh()) == routed
