"""The contract of a registry backend, manager side."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


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

    def list_node(self, ip: str, port: int, node_group: str) -> None:  # noqa: B027 - optional hook
        """Put a node an operator added by hand into the backend's own node list.

        Blocking (call it from a worker thread); idempotent. The built-in backend has no list
        of its own (the `ays_node` row is the list), so the default does nothing. Raises
        RegistryError, or TransientRegistryError when trying again later may work.
        """

    def unlist_node(self, ip: str, port: int) -> None:  # noqa: B027 - optional hook
        """Take a node out of the backend's own node list; the rules of `list_node`."""
