"""What a channel is: something that takes one notice, or says why not."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    """One queued notice, as a channel sends it: `payload` is the JSON document (text)."""

    delivery_id: int
    rule: str
    kind: str  # firing, resolved, test
    summary: str
    payload: str


class DeliveryFailed(Exception):
    """The channel did not take the notice; the message says why (no secret in it). The
    delivery is tried again later (with backoff), until `alerts.max_attempts`."""


class Channel(ABC):
    """A channel backend. `send` returns once the far side has taken the notice, or raises
    `DeliveryFailed`; it never raises anything else for a failure of the far side, and never
    blocks the event loop (blocking clients run in a thread)."""

    name: str

    @abstractmethod
    async def send(self, notice: Notice) -> None: ...
