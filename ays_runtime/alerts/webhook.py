"""The webhook channel: the notice's JSON document POSTed to a URL.

Headers: `Content-Type: application/json`, `X-Ays-Delivery: <id>` (the same on every retry
of one delivery: a receiver may drop repeats), `X-Ays-Event: firing|resolved|test`, and with
a secret `X-Ays-Signature: sha256=<hex>`, the HMAC-SHA256 of the exact body bytes under the
secret (GitHub's scheme; a receiver recomputes it over the raw body and compares in constant
time). A 2xx answer is taken; anything else, or no answer, is a failure retried later.
"""

from __future__ import annotations

import hashlib
import hmac

import httpx

from ays_runtime.alerts.base import Channel, DeliveryFailed, Notice
from ays_runtime.alerts.settings import WebhookChannel

SIGNATURE_HEADER = "X-Ays-Signature"


def signature(secret: str, body: bytes) -> str:
    """The `X-Ays-Signature` value of `body` under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhook(Channel):
    def __init__(self, settings: WebhookChannel, client: httpx.AsyncClient) -> None:
        self.name = settings.name
        self.settings = settings
        self.client = client

    async def send(self, notice: Notice) -> None:
        body = notice.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "X-Ays-Delivery": str(notice.delivery_id),
            "X-Ays-Event": notice.kind,
        }
        if self.settings.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.settings.secret.get_secret_value(), body)
        try:
            answer = await self.client.post(
                self.settings.url, content=body, headers=headers, timeout=self.settings.timeout
            )
        except httpx.HTTPError as err:
            raise DeliveryFailed(f"{type(err).__name__} {err}".strip()) from None
        if not answer.is_success:
            raise DeliveryFailed(f"HTTP {answer.status_code} {answer.text[:200]}")
