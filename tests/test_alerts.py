"""Alert policies against a real manager and node: a local HTTP receiver and a real SMTP
server (aiosmtpd) get the notices, signed; a silenced rule sends nothing; a channel that is
down, even across a manager restart, gets its notice when it is back."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import yaml
from aiosmtpd.controller import Controller

from ays_installer.render import masked_diff, prepare, render_config
from ays_runtime.alerts.base import DeliveryFailed, Notice
from ays_runtime.alerts.settings import AlertSettings, Silence, WebhookChannel
from ays_runtime.alerts.webhook import SIGNATURE_HEADER, Webhook, signature
from ays_runtime.config import expand_placeholders
from tests.daemons import Cluster, cluster, free_port, manager, node, wait_for
from tests.test_cli import cli
from tests.test_end_to_end import add_task
from tests.test_metrics import scrape, value

SECRET = "hmac-secret-for-tests"
ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """A local HTTP server that keeps every POST it gets (headers and body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.posts: list[tuple[dict[str, str], bytes]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiver(port: int) -> Iterator[Receiver]:
    server = Receiver(port)
    try:
        yield server
    finally:
        server.close()


class Mailbox:
    """aiosmtpd's handler: keeps every message it is handed."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope.content.decode("utf-8", "replace"))
        return "250 OK"


@contextmanager
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def alerts_config(hook_port: int, smtp_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "channels": [
            {
                "name": "hook",
                "type": "webhook",
                "url": f"http://127.0.0.1:{hook_port}/ays",
                "secret": SECRET,
                "timeout": 5,
            },
            {
                "name": "mail",
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp_port,
                "starttls": False,
                "sender": "ays@example.test",
                "to": ["ops@example.test"],
            },
        ],
        "retry_first": 0.3,
        "retry_max": 1.0,
        **extra,
    }


def run_once(ays: Cluster, task: int) -> str:
    """Trigger `task` by hand and wait for its run to end; its status."""
    with ays.api() as api:
        job = api.post(f"/tasks/{task}/trigger", json={}).json()["job_log_id"]

        def ended() -> str | None:
            status: str = api.get(f"/job-logs/{job}").json()["status"]
            return status if status not in {"pending", "dispatched", "running"} else None

        return str(wait_for(ended, 60, f"run {job} to end"))


@pytest.mark.slow
def test_failures_alert_once_each_and_once_per_streak_then_recover(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    now = datetime.now(UTC)
    silence = {
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(hours=1)).isoformat(),
    }
    with receiver(free_port()) as hook, smtp_server() as (mailbox, smtp_port):
        rules = [
            {
                "name": "failed",
                "when": "run_failed",
                "tasks": ["flaky"],
                "channels": ["hook", "mail"],
            },
            {"name": "three", "when": "consecutive_failures", "count": 3, "channels": ["hook"]},
            {"name": "quiet", "when": "run_failed", "channels": ["hook"], "silences": [silence]},
            {"name": "late", "when": "started_late", "seconds": 0.000001, "channels": ["hook"]},
            {"name": "punctual", "when": "started_late", "seconds": 30, "channels": ["hook"]},
        ]
        config = alerts_config(hook.port, smtp_port, rules=rules)
        with cluster(tmp_path, Cluster, alerts=config) as ays:
            task = add_task(ays, f"test ! -e {broken}", name="flaky")
            for _ in range(3):
                assert run_once(ays, task) == "failed"
            broken.unlink()
            assert run_once(ays, task) == "succeeded"

            def kinds() -> list[tuple[str, str]]:
                return sorted((d["rule"], d["kind"]) for d in hook.documents())

            expected = [
                ("failed", "firing"),
                ("failed", "firing"),
                ("failed", "firing"),
                ("failed", "resolved"),
                ("late", "firing"),
                ("late", "firing"),
                ("late", "firing"),
                ("late", "firing"),
                ("three", "firing"),
                ("three", "resolved"),
            ]
            wait_for(lambda: kinds() == expected, 60, f"the notices {expected}, got {kinds()}")
            wait_for(lambda: len(mailbox.messages) == 4, 60, "four mails (3 failed, 1 resolved)")
            # Every body is signed with the channel's secret, and says what happened.
            for headers, body in hook.posts:
                assert headers[SIGNATURE_HEADER.lower()] == signature(SECRET, body)
                document = json.loads(body)
                assert document["task"] == {"id": task, "name": "flaky", "node_group": "g1"}
            firing = next(d for d in hook.documents() if d["rule"] == "three")
            assert firing["run"]["status"] == "failed" and firing["run"]["exit_code"] == 1
            assert "3 runs in a row" in firing["summary"]
            assert any(
                "Subject: [ays dev] FIRING failed: task flaky" in m for m in mailbox.messages
            )
            assert all("quiet" not in d["rule"] for d in hook.documents())  # silenced
            late = next(d for d in hook.documents() if d["rule"] == "late")
            assert late["run"]["started_at"] and "after its scheduled time" in late["summary"]
            with ays.api() as api:
                sent = api.get("/alerts/deliveries", params={"status": "sent"}).json()["items"]
                assert len(sent) == 14  # 10 notices to the hook, 4 mails
                rules_now = {
                    r["name"]: r["silenced"] for r in api.get("/alerts/rules").json()["rules"]
                }
                assert rules_now == {
                    "failed": False,
                    "three": False,
                    "quiet": True,
                    "late": False,
                    "punctual": False,
                }
            counted = scrape(ays.manager_port)
            assert (
                value(counted, "ays_alert_deliveries_total", channel="hook", outcome="sent") == 10
            )
            assert value(counted, "ays_alert_deliveries_total", channel="mail", outcome="sent") == 4
            # Seconds later nothing more arrives: one notice each, not one per look.
            assert kinds() == expected


@pytest.mark.slow
def test_a_channel_that_is_down_gets_its_notice_when_it_is_back_even_after_a_restart(
    tmp_path: Path,
) -> None:
    hook_port = free_port()
    with smtp_server() as (_, smtp_port):
        config = alerts_config(hook_port, smtp_port)
        with cluster(tmp_path, Cluster, with_node=False, alerts=config) as ays:
            with ays.api() as api:
                unknown = api.post("/alerts/test", json={"channel": "pager"})
                assert unknown.status_code == 422
                assert unknown.json()["field"] == "channel"
                queued = api.post("/alerts/test", json={"channel": "hook"})
                assert queued.status_code == 202, queued.text
                delivery = queued.json()["delivery_id"]

                def tried() -> dict[str, Any] | None:
                    items = api.get("/alerts/deliveries").json()["items"]
                    row = next(d for d in items if d["id"] == delivery)
                    return row if row["attempts"] >= 2 else None

                row = wait_for(tried, 60, "two failed tries")
                assert row["status"] == "queued" and row["last_error"]
            where = ("--config", str(ays.config))
            down = cli("alerts", "test", "hook", "--wait", "1", *where)
            assert down.returncode == 1, down.stdout + down.stderr
            assert "has not taken test notice" in down.stderr and "retried" in down.stderr
            ays.manager.stop()  # the notices are queued in the database, not in the process
            with receiver(hook_port) as hook:
                ays.manager = manager(ays.config, tmp_path / "m2.log", ays.manager_port).start()
                wait_for(lambda: len(hook.posts) == 2, 60, "both notices once the hook is up")
                document = hook.documents()[0]
                assert document["kind"] == "test" and document["env"] == "dev"
                up = cli("alerts", "test", "hook", *where)
                assert up.returncode == 0, up.stdout + up.stderr
                assert "channel hook took it" in up.stdout
                assert len(hook.posts) == 3
                listed = cli("alerts", "list", *where)
                assert listed.returncode == 0 and "no alert rules" in listed.stdout
                sent = cli("alerts", "deliveries", "--status", "sent", *where)
                rows = [line.split() for line in sent.stdout.splitlines()[1:]]
                assert sent.returncode == 0, sent.stderr
                assert [(r[3], r[5], r[6]) for r in rows] == [("test", "hook", "sent")] * 3
                with ays.api() as api:

                    def sent() -> bool:
                        items = api.get("/alerts/deliveries").json()["items"]
                        return next(d for d in items if d["id"] == delivery)["status"] == "sent"

                    wait_for(sent, 30, "the delivery booked as sent")


def test_an_env_with_alerts_renders_them_for_the_manager_masked_and_none_for_a_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = yaml.safe_load((ROOT / "envs" / "dev.yaml").read_text(encoding="utf-8"))
    rules = [
        {"name": "failed", "when": "run_failed", "channels": ["hook", "mail"]},
        {
            "name": "quiet",
            "when": "consecutive_failures",
            "count": 2,
            "channels": ["mail"],
            "silences": [{"start": "2026-12-24T00:00:00Z", "end": "2026-12-27T00:00:00Z"}],
        },
    ]
    alerts = alerts_config(9, 25, rules=rules)
    alerts["channels"][0]["secret"] = "${AYS_ALERT_KEY}"
    alerts["channels"][1] |= {"username": "ays", "password": "smtp-pa55word"}
    path = tmp_path / "envs" / "site.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**env, "env": "site", "alerts": alerts}), encoding="utf-8")
    monkeypatch.setenv("AYS_ALERT_KEY", "hook-k3y-value")

    manager = prepare(str(path), "manager", root=tmp_path / "root")
    text = render_config(manager)  # checks that it loads back into the same settings
    written = yaml.safe_load(text)["alerts"]
    assert written["channels"][0]["secret"] == "hook-k3y-value"
    assert [r["name"] for r in written["rules"]] == ["failed", "quiet"]
    shown = masked_diff("", text, Path("manager.yaml"), manager.secrets)
    assert "hook-k3y-value" not in shown and "smtp-pa55word" not in shown
    assert "alerts:" in shown

    node = prepare(str(path), "node", root=tmp_path / "root")
    assert yaml.safe_load(render_config(node))["alerts"]["channels"] == []


def test_bad_alert_settings_are_refused_naming_the_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="no channel named pager"):
        AlertSettings.model_validate(
            {"rules": [{"name": "r", "when": "run_failed", "channels": ["pager"]}]}
        )
    with pytest.raises(pydantic.ValidationError, match="end must be after its start"):
        Silence.model_validate({"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"})


def test_chat_formats_carry_the_text_and_their_services_signatures() -> None:
    seen: list[httpx.Request] = []
    answers = {"dingtalk": {"errcode": 0}, "wecom": {"errcode": 0}, "feishu": {"code": 0}}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        fmt = request.url.path.strip("/")
        return httpx.Response(200, json=answers.get(fmt, {}))

    notice = Notice(7, "failed", "firing", "task flaky (id 3) failed", '{"rule": "failed"}')

    async def send(fmt: str, secret: str | None = None) -> httpx.Request:
        settings = WebhookChannel.model_validate(
            {"name": fmt, "type": "webhook", "url": f"http://chat.test/{fmt}", "format": fmt}
            | ({"secret": secret} if secret else {})
        )
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await Webhook(settings, client).send(notice)
        return seen[-1]

    text = "[FIRING] failed: task flaky (id 3) failed"
    slack = asyncio.run(send("slack"))
    assert json.loads(slack.content) == {"text": text}
    wecom = asyncio.run(send("wecom"))
    assert json.loads(wecom.content) == {"msgtype": "text", "text": {"content": text}}
    ding = asyncio.run(send("dingtalk", "ding-secret"))
    assert json.loads(ding.content)["text"] == {"content": text}
    stamp = ding.url.params["timestamp"]
    expected = hmac.new(b"ding-secret", f"{stamp}\nding-secret".encode(), hashlib.sha256)
    assert ding.url.params["sign"] == base64.b64encode(expected.digest()).decode()
    feishu = json.loads(asyncio.run(send("feishu", "fei-secret")).content)
    assert feishu["content"] == {"text": text}
    key = f"{feishu['timestamp']}\nfei-secret".encode()
    expected = hmac.new(key, b"", hashlib.sha256)
    assert feishu["sign"] == base64.b64encode(expected.digest()).decode()

    # These services answer 200 with an error code: that is a failure, retried later.
    answers["dingtalk"] = {"errcode": 310000, "errmsg": "sign not match"}
    with pytest.raises(DeliveryFailed, match="code 310000 sign not match"):
        asyncio.run(send("dingtalk", "wrong"))
    with pytest.raises(pydantic.ValidationError, match="slack webhooks are not signed"):
        WebhookChannel.model_validate(
            {"name": "s", "type": "webhook", "url": "http://x/", "format": "slack", "secret": "k"}
        )


@pytest.mark.slow
def test_a_node_going_offline_its_empty_group_and_a_long_run_alert_and_recover(
    tmp_path: Path,
) -> None:
    with receiver(free_port()) as hook, smtp_server() as (_, smtp_port):
        rules = [
            {"name": "down", "when": "node_offline", "channels": ["hook"]},
            {
                "name": "empty",
                "when": "group_unhealthy",
                "node_groups": ["g1"],
                "channels": ["hook"],
            },
            {"name": "slow", "when": "running_longer_than", "seconds": 1, "channels": ["hook"]},
        ]
        config = alerts_config(hook.port, smtp_port, rules=rules, watch_interval=0.3)
        with cluster(tmp_path, Cluster, alerts=config) as ays:
            assert ays.node is not None
            task = add_task(ays, "sleep 5")
            with ays.api() as api:
                job = api.post(f"/tasks/{task}/trigger", json={}).json()["job_log_id"]

            def notices() -> list[tuple[str, str]]:
                return sorted((d["rule"], d["kind"]) for d in hook.documents())

            wait_for(lambda: ("slow", "firing") in notices(), 60, "the long run's notice")
            slow = next(d for d in hook.documents() if d["rule"] == "slow")
            assert slow["subject"] == f"run {job}" and slow["task"]["id"] == task
            ays.node.kill()
            down = [("down", "firing"), ("empty", "firing"), ("slow", "firing")]
            wait_for(lambda: notices() == down, 60, f"{down}, got {notices()}")
            firing = {d["rule"]: d for d in hook.documents()}
            assert firing["down"]["subject"] == f"node 127.0.0.1:{ays.node_port}"
            assert firing["empty"]["subject"] == "group g1"
            ays.node = node(ays.config, tmp_path / "node2.log", "g1", ays.node_port).start()
            up = sorted([*down, ("down", "resolved"), ("empty", "resolved")])
            wait_for(lambda: notices() == up, 60, f"{up}, got {notices()}")


@pytest.mark.slow
def test_slots_missed_while_no_manager_ran_alert_once_when_a_manager_starts(
    tmp_path: Path,
) -> None:
    with receiver(free_port()) as hook, smtp_server() as (_, smtp_port):
        rules = [{"name": "missed", "when": "slot_missed", "channels": ["hook"]}]
        config = alerts_config(hook.port, smtp_port, rules=rules, watch_interval=0.3)
        with cluster(
            tmp_path, Cluster, with_node=False, alerts=config, manager={"misfire_grace": 1}
        ) as ays:
            with ays.api() as api:
                assert api.post("/node-groups", json={"name": "g1"}).status_code == 201
            task = add_task(ays, "true", schedule="* * * * * *")

            def fired() -> bool:
                with ays.api() as api:
                    return api.get("/job-logs", params={"task_id": task}).json()["total"] >= 2

            wait_for(fired, 60, "the task's first fires")
            ays.manager.stop()
            time.sleep(4)  # no manager: the slots of these seconds are owed
            ays.manager = manager(ays.config, tmp_path / "m2.log", ays.manager_port).start()
            wait_for(lambda: hook.documents(), 60, "the missed slots' notice")
            time.sleep(1.5)  # a few more looks raise nothing new
            [notice] = hook.documents()
            assert notice["rule"] == "missed" and notice["subject"] == f"task {task}"
            assert notice["slots"]["reason"] == "missed" and notice["slots"]["count"] >= 3
            assert "no manager was running" in notice["summary"]


def test_the_readme_example_is_a_valid_alerts_section() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("\n## Alerts\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    secrets = {"AYS_ALERT_KEY": "k", "AYS_SMTP_PASSWORD": "p", "AYS_DINGTALK_SECRET": "d"}
    data = expand_placeholders(yaml.safe_load(block), "README", environ=secrets)
    settings = AlertSettings.model_validate(data["alerts"])
    assert {channel.name for channel in settings.channels} == {"ops-hook", "ops-mail", "team-chat"}
    assert [rule.when for rule in settings.rules] == [
        "run_failed",
        "consecutive_failures",
        "running_longer_than",
        "node_offline",
    ]


API_SECRET = "api-made-hmac-key"


@pytest.mark.slow
def test_policies_made_through_the_api_merge_with_the_env_file_hide_secrets_and_are_audited(
    tmp_path: Path,
) -> None:
    with (
        receiver(free_port()) as hook,
        receiver(free_port()) as api_hook,
        smtp_server() as (_, smtp_port),
    ):
        rules = [{"name": "failed", "when": "run_failed", "channels": ["hook"]}]
        config = alerts_config(hook.port, smtp_port, rules=rules)
        with cluster(tmp_path, Cluster, alerts=config) as ays, ays.api() as api:
            channel = {
                "name": "api-hook",
                "type": "webhook",
                "url": f"http://127.0.0.1:{api_hook.port}/in",
                "secret": API_SECRET,
            }
            made = api.post("/alerts/channels", json=channel)
            assert made.status_code == 201, made.text
            assert made.json()["secret_set"] is True and "secret" not in made.json()
            # Bad input: 422 naming the field; a name taken or an env-file item: 409.
            bad = api.post("/alerts/channels", json={**channel, "name": "x", "url": "ftp://x"})
            assert bad.status_code == 422 and bad.json()["field"] == "url", bad.text
            assert API_SECRET not in bad.text
            bad = api.post("/alerts/rules", json={"name": "r", "when": "bogus", "channels": []})
            assert bad.status_code == 422 and bad.json()["field"] == "when", bad.text
            bad = api.post("/alerts/rules", json={"name": "r", "channels": ["nowhere"]})
            assert bad.status_code == 422 and bad.json()["field"] == "when", bad.text
            bad = api.post(
                "/alerts/rules", json={"name": "r", "when": "run_failed", "channels": ["nowhere"]}
            )
            assert bad.status_code == 422 and bad.json()["field"] == "channels", bad.text
            assert api.post("/alerts/channels", json=channel).status_code == 409
            env_rule = {"when": "run_failed", "channels": ["hook"]}
            assert api.put("/alerts/rules/failed", json=env_rule).status_code == 409
            assert api.delete("/alerts/channels/hook").status_code == 409
            rule = {"name": "api-failed", "when": "run_failed", "channels": ["api-hook", "hook"]}
            assert api.post("/alerts/rules", json=rule).status_code == 201
            listed = api.get("/alerts/rules").json()
            sources = {c["name"]: (c["source"], c["read_only"]) for c in listed["channels"]}
            assert sources == {
                "hook": ("env", True),
                "mail": ("env", True),
                "api-hook": ("api", False),
            }
            assert {r["name"]: r["source"] for r in listed["rules"]} == {
                "failed": "env",
                "api-failed": "api",
            }
            assert API_SECRET not in json.dumps(listed) and SECRET not in json.dumps(listed)
            # An update without the secret keeps it: the notice is still signed with it.
            kept = api.put("/alerts/channels/api-hook", json={**channel, "secret": None} | {})
            assert kept.json()["secret_set"] is False
            del channel["secret"]
            restored = api.put("/alerts/channels/api-hook", json={**channel, "secret": API_SECRET})
            assert restored.json()["secret_set"] is True
            unchanged = api.put("/alerts/channels/api-hook", json=channel)
            assert unchanged.status_code == 200 and unchanged.json()["secret_set"] is True

            task = add_task(ays, "false", name="broken")
            assert run_once(ays, task) == "failed"
            wait_for(lambda: len(api_hook.posts) == 1, 60, "the api rule's notice")
            headers, body = api_hook.posts[0]
            assert headers[SIGNATURE_HEADER.lower()] == signature(API_SECRET, body)
            assert json.loads(body)["rule"] == "api-failed"

            # Silenced: the env rule's notice of the next failure arrives, the api rule's not.
            silenced = api.post("/alerts/rules/api-failed/silences", json={"minutes": 60})
            assert silenced.status_code == 201, silenced.text
            assert api.get("/alerts/rules").json()["rules"][1]["silenced"] is True
            assert run_once(ays, task) == "failed"

            def failed_notices() -> int:
                return sum(d["rule"] == "failed" for d in hook.documents())

            wait_for(lambda: failed_notices() == 2, 60, "the env rule's second notice")
            assert len(api_hook.posts) == 1
            assert api.delete("/alerts/rules/api-failed/silences").json() == {"ended": 1}

            assert api.delete("/alerts/channels/api-hook").status_code == 409  # in use
            assert api.delete("/alerts/rules/api-failed").status_code == 204
            assert api.delete("/alerts/channels/api-hook").status_code == 204
            assert api.delete("/alerts/channels/api-hook").status_code == 404

            trail = api.get("/audit", params={"limit": 100}).json()["items"]
            actions = [e["action"] for e in trail if e["target_type"].startswith("alert_")]
            assert actions == [
                "alert_channel.deleted",
                "alert_rule.deleted",
                "alert_rule.unsilenced",
                "alert_rule.silenced",
                "alert_channel.updated",
                "alert_channel.updated",
                "alert_channel.updated",
                "alert_rule.created",
                "alert_channel.created",
            ]
            assert API_SECRET not in json.dumps(trail)
            updated = next(e for e in trail if e["action"] == "alert_channel.updated")
            assert updated["before"]["secret_set"] is True and "secret" not in updated["after"]


@pytest.mark.slow
def test_a_run_taking_factor_times_its_tasks_usual_duration_alerts_and_usual_runs_do_not(
    tmp_path: Path,
) -> None:
    duration = tmp_path / "duration"
    duration.write_text("0.2")
    with receiver(free_port()) as hook, smtp_server() as (_, smtp_port):
        rules = [
            {
                "name": "unusual",
                "when": "running_longer_than",
                "seconds": 3600,
                "factor": 4,
                "history": 5,
                "channels": ["hook"],
            }
        ]
        config = alerts_config(hook.port, smtp_port, rules=rules, watch_interval=0.2)
        with cluster(tmp_path, Cluster, alerts=config) as ays:
            task = add_task(ays, f'sleep "$(cat {duration})"', name="usually-quick")
            for _ in range(3):  # its usual duration: about 0.2 s
                assert run_once(ays, task) == "succeeded"
            assert hook.posts == []
            duration.write_text("60")
            with ays.api() as api:
                job = api.post(f"/tasks/{task}/trigger", json={}).json()["job_log_id"]
                wait_for(lambda: hook.posts, 60, "the unusual run's notice")
                (notice,) = hook.documents()
                assert notice["rule"] == "unusual" and notice["subject"] == f"run {job}"
                assert "x its usual" in notice["summary"], notice["summary"]
                assert api.post(f"/job-logs/{job}/kill", json={}).status_code in (200, 202)


def test_a_rule_whose_check_raises_is_counted_and_skipped_and_the_others_go_on(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in one rule's check (injected: no rule of Ays raises on purpose) must not stop
    the alert service: the rule is counted in ays_alert_rule_errors_total and skipped, the
    other rules still raise their notices."""
    from ays_runtime.alerts import watch
    from ays_runtime.alerts.service import AlertService
    from ays_runtime.metrics.manager import REGISTRY
    from ays_runtime.storage.database import make_engine, session_factory
    from ays_runtime.storage.models import NodeGroup, Task

    checks = watch._bad_subjects

    def faulty(conn: Any, rule: Any) -> dict[str, str]:
        if rule.name == "broken":
            raise RuntimeError("a fault in this rule's check")
        return checks(conn, rule)

    monkeypatch.setattr(watch, "_bad_subjects", faulty)
    engine = make_engine(sqlite_url)
    now = datetime.now(UTC).replace(tzinfo=None)
    with session_factory(engine)() as session:
        session.add(NodeGroup(name="empty", created_at=now, updated_at=now))
        session.flush()
        session.add(
            Task(
                name="t",
                node_group="empty",
                schedule="0 0 0 1 1 *",
                payload={"command": "true"},
                created_at=now,
                updated_at=now,
            )
        )
        session.commit()

    def errors() -> float:
        return REGISTRY.get_sample_value("ays_alert_rule_errors_total", {"rule": "broken"}) or 0

    before = errors()
    with receiver(free_port()) as hook:
        settings = AlertSettings.model_validate(
            {
                "channels": [
                    {"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{hook.port}/"}
                ],
                "rules": [
                    {"name": "broken", "when": "node_offline", "channels": ["hook"]},
                    {"name": "empty", "when": "group_unhealthy", "channels": ["hook"]},
                ],
                "watch_interval": 0.1,
            }
        )
        service = AlertService(engine, settings, "dev", "test-manager")

        async def scenario() -> None:
            running = asyncio.create_task(service.run())
            deadline = time.monotonic() + 60
            while (not hook.posts or errors() < before + 3) and time.monotonic() < deadline:
                assert not running.done(), running
                await asyncio.sleep(0.05)
            assert not running.done()
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running

        asyncio.run(scenario())
        assert [d["rule"] for d in hook.documents()] == ["empty"]
        assert errors() >= before + 3  # tried again at every look, not dropped
    engine.dispose()


@pytest.mark.slow
def test_the_cli_adds_silences_lists_and_removes_channels_and_rules_secret_from_the_env(
    tmp_path: Path,
) -> None:
    with receiver(free_port()) as hook, smtp_server() as (_, smtp_port):
        config = alerts_config(hook.port, smtp_port)
        with cluster(tmp_path, Cluster, with_node=False, alerts=config) as ays:
            where = ("--config", str(ays.config))
            secret = {"HOOK_KEY": API_SECRET}
            url = f"http://127.0.0.1:{hook.port}/cli"
            hook_args = ("--webhook-url", url, "--secret-env")
            made = cli("alerts", "add-channel", "ops", *hook_args, "HOOK_KEY", *where, **secret)
            assert made.returncode == 0, made.stderr
            unset = cli("alerts", "add-channel", "x", *hook_args, "NOPE", *where)
            assert unset.returncode == 2 and "NOPE" in unset.stderr
            bad = cli("alerts", "add", "r1", "--when", "bogus", "--channel", "ops", *where)
            assert bad.returncode == 2 and "when" in bad.stderr, bad.stderr
            added = cli("alerts", "add", "slow", "--when", "running_longer_than", "--seconds",
                        "60", "--factor", "3", "--channel", "ops", *where)  # fmt: skip
            assert added.returncode == 0, added.stderr
            quiet = cli("alerts", "silence", "slow", "--for", "2h", *where)
            assert quiet.returncode == 0 and "silenced alert rule slow" in quiet.stdout
            listed = cli("alerts", "list", *where)
            row = next(line.split() for line in listed.stdout.splitlines() if "slow" in line)
            assert row[:2] == ["slow", "api"] and row[-1] == "now", listed.stdout
            channels = cli("alerts", "channels", *where)
            assert API_SECRET not in channels.stdout
            ops = next(line.split() for line in channels.stdout.splitlines() if line[:4] == "ops ")
            assert ops[1] == "api" and ops[-1] == "set", channels.stdout
            assert cli("alerts", "test", "ops", *where).returncode == 0
            headers, body = hook.posts[0]
            assert headers[SIGNATURE_HEADER.lower()] == signature(API_SECRET, body)
            assert cli("alerts", "unsilence", "slow", *where).stdout.startswith("ended 1")
            busy = cli("alerts", "remove-channel", "ops", *where)
            assert busy.returncode == 1 and "slow" in busy.stderr, busy.stderr
            assert cli("alerts", "remove", "slow", *where).returncode == 0
            assert cli("alerts", "remove-channel", "ops", *where).returncode == 0
            since = cli("alerts", "deliveries", "--since", "1h", "-n", "5", *where)
            assert since.returncode == 0 and "test" in since.stdout, since.stderr
            audit = cli("audit", "--since", "1h", "--limit", "50", "--json", *where)
            assert API_SECRET not in audit.stdout
            assert '"alert_channel.created"' in audit.stdout
