"""The contract of a registry backend, manager side, and the rule every way a node joins
keeps: a node joining a group that does not exist creates it (`ensure_node_groups`)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, select

from ays_runtime.storage.database import insert_ignoring_duplicates, utcnow
from ays_runtime.storage.models import NodeGroup

SETTLE_POLL = 0.1  # seconds between looks while a registry settles


@dataclass(frozen=True)
class NodeRef:
    """A healthy node as routing sees it."""

    ip: str
    port: int
    node_group: str
    running_jobs: int = 0

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


NodeLostCallback = Callable[[str], Awaitable[None]]


def ensure_node_groups(conn: Connection, joined: Mapping[str, str]) -> list[str]:
    """Create each group of `joined` (group name -> the address of a node that joined it)
    that is not a node group yet, recorded as auto-created; return the names created.

    Inside the caller's transaction. A group that exists (however it was made) is left
    alone; two managers creating the same group at once both succeed (the insert skips an
    existing name), so a node joining is never refused for it. Costs one indexed SELECT when
    every group exists."""
    names = sorted(joined)
    if not names:
        return []
    existing = set(conn.scalars(select(NodeGroup.name).where(NodeGroup.name.in_(names))))
    missing = [name for name in names if name not in existing]
    if missing:
        now = utcnow()
        rows = [
            {
                "name": name,
                "description": f"created when node {joined[name]} joined it",
                "auto_created": True,
                "created_at": now,
                "updated_at": now,
            }
            for name in missing
        ]
        insert_ignoring_duplicates(conn, NodeGroup, rows, keep="name")
    return missing


class NodeRegistry(ABC):
    """Tracks node health and answers routing's question: which nodes may take work now.

    A backend keeps `ays_node.status` and `last_seen` current within seconds of a change,
    calls `on_node_lost(address)` once each time a node goes from online to offline, and
    answers `healthy_nodes` from memory (no I/O on the dispatch path). When its source of
    truth is unreachable it keeps the last known states and says so once in the log.
    """

    on_node_lost: NodeLostCallback | None = None

    @abstractmethod
    async def start(self) -> None:
        """Load the known nodes and start following their health."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop following; must return within a few seconds."""

    @abstractmethod
    def healthy_nodes(self, node_group: str) -> list[NodeRef]:
        """Online nodes of `node_group`, in a stable order (by ip, then port)."""

    def settling(self, node_group: str) -> bool:
        """Whether runs for `node_group` should wait a moment before being routed: the
        backend has just started and may know of a node of the group it does not trust yet
        (see BuiltinRegistry). False by default; it must turn False within seconds."""
        return False

    async def settled(self, node_group: str) -> None:
        """Return once `settling(node_group)` is False."""
        while self.settling(node_group):
            await asyncio.sleep(SETTLE_POLL)

    def list_node(self, ip: str, port: int, node_group: str) -> None:  # noqa: B027 - optional hook
        """Put a node an operator added by hand into the backend's own node list.

        Blocking (call it from a worker thread); idempotent. The built-in backend has no list
        of its own (the `ays_node` row is the list), so the default does nothing. Raises
        RegistryError, or TransientRegistryError when trying again later may work.
        """

    def unlist_node(self, ip: str, port: int) -> None:  # noqa: B027 - optional hook
        """Take a node out of the backend's own node list; the rules of `list_node`."""
