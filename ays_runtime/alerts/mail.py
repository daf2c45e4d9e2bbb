"""The email channel: the notice as a plain-text mail over SMTP (STARTTLS and AUTH when the
channel says so), sent from a thread (smtplib blocks)."""

from __future__ import annotations

import asyncio
import json
import smtplib
import ssl
from email.message import EmailMessage

from ays_runtime.alerts.base import Channel, DeliveryFailed, Notice
from ays_runtime.alerts.settings import EmailChannel


class Mail(Channel):
    def __init__(self, settings: EmailChannel, env: str) -> None:
        self.name = settings.name
        self.settings = settings
        self.env = env

    def message(self, notice: Notice) -> EmailMessage:
        message = EmailMessage()
        message["Subject"] = (
            f"[ays {self.env}] {notice.kind.upper()} {notice.rule}: {notice.summary}"
        )
        message["From"] = self.settings.sender
        message["To"] = ", ".join(self.settings.to)
        message["X-Ays-Delivery"] = str(notice.delivery_id)
        document = json.dumps(json.loads(notice.payload), indent=2, sort_keys=True)
        message.set_content(f"{notice.summary}\n\n{document}\n")
        return message

    async def send(self, notice: Notice) -> None:
        await asyncio.to_thread(self._send, self.message(notice))

    def _send(self, message: EmailMessage) -> None:
        s = self.settings
        try:
            with smtplib.SMTP(s.host, s.port, timeout=s.timeout) as smtp:
                if s.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if s.username:
                    password = s.password.get_secret_value() if s.password is not None else ""
                    smtp.login(s.username, password)
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as err:
            # smtplib's errors name the server's answer, never the password.
            raise DeliveryFailed(f"SMTP {s.host}:{s.port}: {type(err).__name__} {err}") from None
