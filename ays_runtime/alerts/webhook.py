"""The webhook channel: the notice POSTed to a URL, as Ays' JSON document or as a chat
service's incoming-webhook message (`format`).

`ays` (the default) sends the document. Headers: `Content-Type: application/json`,
`X-Ays-Delivery: <id>` (the same on every retry of one delivery: a receiver may drop
repeats), `X-Ays-Event: firing|resolved|test`, and with a secret `X-Ays-Signature:
sha256=<hex>`, the HMAC-SHA256 of the exact body bytes under the secret (GitHub's scheme;
a receiver recomputes it over the raw body and compares in constant time). A 2xx answer is
taken; anything else, or no answer, is a failure retried later.

`slack`, `dingtalk`, `wecom` and `feishu` send a text message (`[FIRING] rule: summary`) in
the service's format; a DingTalk or Feishu robot's signing secret signs it their way
(DingTalk: `timestamp` and `sign` in the query; Feishu: in the body). Those services answer
200 with an error code in the body; a non-zero code is a failure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

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
        fmt = self.settings.format
        secret = self.settings.secret.get_secret_value() if self.settings.secret else None
        headers = {
            "Content-Type": "application/json",
            "X-Ays-Delivery": str(notice.delivery_id),
            "X-Ays-Event": notice.kind,
        }
        params: dict[str, str] = {}
        if fmt == "ays":
            body = notice.payload.encode()
            if secret is not None:
                headers[SIGNATURE_HEADER] = signature(secret, body)
        else:
            text = f"[{notice.kind.upper()}] {notice.rule}: {notice.summary}"
            message = chat_message(fmt, text)
            if secret is not None and fmt == "dingtalk":
                params = dingtalk_signature(secret, int(time.time() * 1000))
            elif secret is not None and fmt == "feishu":
                message |= feishu_signature(secret, int(time.time()))
            body = json.dumps(message).encode()
        try:
            answer = await self.client.post(
                self.settings.url,
                content=body,
                headers=headers,
                params=params,
                timeout=self.settings.timeout,
            )
        except httpx.HTTPError as err:
            raise DeliveryFailed(f"{type(err).__name__} {err}".strip()) from None
        if not answer.is_success:
            raise DeliveryFailed(f"HTTP {answer.status_code} {answer.text[:200]}")
        if fmt in ("dingtalk", "wecom", "feishu"):
            _check_code(fmt, answer)


def chat_message(fmt: str, text: str) -> dict[str, Any]:
    """`text` as a `fmt` incoming-webhook message."""
    if fmt == "slack":
        return {"text": text}
    if fmt == "feishu":
        return {"msg_type": "text", "content": {"text": text}}
    return {"msgtype": "text", "text": {"content": text}}  # dingtalk, wecom


def dingtalk_signature(secret: str, timestamp_ms: int) -> dict[str, str]:
    """DingTalk's query parameters: HMAC-SHA256 of "timestamp\\nsecret" under the secret."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return {"timestamp": str(timestamp_ms), "sign": base64.b64encode(digest.digest()).decode()}


def feishu_signature(secret: str, timestamp_s: int) -> dict[str, str]:
    """Feishu's body fields: HMAC-SHA256 of nothing under the key "timestamp\\nsecret"."""
    digest = hmac.new(f"{timestamp_s}\n{secret}".encode(), b"", hashlib.sha256)
    return {"timestamp": str(timestamp_s), "sign": base64.b64encode(digest.digest()).decode()}


def _check_code(fmt: str, answer: httpx.Response) -> None:
    try:
        data = answer.json()
    except ValueError:
        return  # no JSON: the HTTP status said it was taken
    if not isinstance(data, dict):
        return
    code = data.get("code", data.get("StatusCode")) if fmt == "feishu" else data.get("errcode")
    if code not in (None, 0):
        why = data.get("msg") or data.get("errmsg") or data.get("StatusMessage") or ""
        raise DeliveryFailed(f"{fmt} refused it: code {code} {why}".strip())
