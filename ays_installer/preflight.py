"""installConfig's preflight for an env that dispatches through RocketMQ.

Before anything is written, the host must reach every proxy endpoint of `transport.endpoints`
and the topics the role uses must exist there:

    node      <topic_prefix><group>, <topic_prefix><group>_bcast, <result_topic>
    manager   <result_topic>, and both topics of every node group in the database when the
              database can be read (a fresh install has none yet: that is said, not failed)

It prints one line per check and, for a missing topic, the `mqadmin updateTopic` command that
creates it. An unreachable proxy or a missing topic is a clear error with a non-zero exit, never
a traceback; `--skip-preflight` skips all of it (staging on a host without network).
The RocketMQ client's own log goes to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable

from ays_installer.render import Prepared
from ays_runtime.config import RocketMQTransportSettings
from ays_runtime.exceptions import ConfigError
from ays_runtime.transport import rocketmq_client as mq

Echo = Callable[[str], None]


class PreflightFailed(ConfigError):
    """The proxy cannot be reached from this host, or topics the role needs are missing."""


def needs_preflight(prepared: Prepared) -> bool:
    return prepared.config.transport.backend == "rocketmq"


def run_preflight(prepared: Prepared, echo: Echo) -> None:
    """Check the role's proxy and topics; print what was found; raise PreflightFailed."""
    settings = prepared.config.transport
    assert isinstance(settings, RocketMQTransportSettings)
    source = f"envs/{prepared.source.name}"
    groups, note = _groups(prepared)
    for group in groups:
        mq.check_names(settings, group, source)
    topics = mq.role_topics(settings, groups)
    scratch = tempfile.mkdtemp(prefix="ays-preflight-")
    try:
        mq.load_client(scratch)
        probes = mq.probe_topics(settings, topics)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    echo(f"preflight: RocketMQ for the {prepared.role} ({', '.join(topics)})")
    unreachable = [p for p in probes if p.error]
    missing: dict[str, None] = {}
    for probe in probes:
        if probe.error:
            echo(f"  unreachable  {probe.endpoint}: {probe.error}")
            continue
        echo(f"  ok           {probe.endpoint} answers")
        for topic in probe.found:
            echo(f"  ok           topic {topic}")
        for topic in probe.missing:
            missing[topic] = None
            echo(f"  missing      topic {topic}: create it with")
            echo(f"                 {mq.mqadmin_command(settings, topic)}")
        for topic, why in probe.failed.items():
            echo(f"  unknown      topic {topic}: {why}")
    if note:
        echo(f"  note         {note}")
    skip = "or install without this check with --skip-preflight (e.g. staging)"
    if unreachable:
        endpoints = ", ".join(p.endpoint for p in unreachable)
        raise PreflightFailed(
            f"this host cannot reach the RocketMQ proxy {endpoints} (transport.endpoints in "
            f"{source}): check the address, the network or firewall between them, and that "
            f"the proxy runs; {skip}"
        )
    if missing:
        raise PreflightFailed(
            f"{len(missing)} RocketMQ topic(s) the {prepared.role} uses do not exist: "
            f"{', '.join(missing)}; create them with the mqadmin commands above "
            f"(transport.name_server and transport.cluster in {source} fill them in), {skip}"
        )
    failed = sorted({t for p in probes for t in p.failed})
    if failed:
        raise PreflightFailed(
            f"the RocketMQ proxy would not say whether {', '.join(failed)} exist (see above); "
            f"check the credentials (transport.access_key/secret_key), {skip}"
        )


def _groups(prepared: Prepared) -> tuple[list[str], str]:
    """The node groups whose topics the role uses, and a note when they cannot be known."""
    config = prepared.config
    if prepared.role == "node":
        if config.node.group:
            return [config.node.group], ""
        return [], "no node group given (-g GROUP): the group's two topics are not checked"
    try:
        return _groups_in_database(config.storage_url()), ""
    except Exception as err:  # any database trouble only narrows the check
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        prefix = getattr(config.transport, "topic_prefix", "")
        return [], (
            f"node groups could not be read from the database ({reason}); each group G "
            f"needs topics {prefix}G and {prefix}G_bcast"
        )


def _groups_in_database(url: str) -> list[str]:
    from sqlalchemy import create_engine, select

    from ays_runtime.storage.models import NodeGroup

    if url.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(url.removeprefix("sqlite:///")).is_file():
            raise FileNotFoundError("no database yet")  # connecting would create the file
    args = {"connect_timeout": 5} if url.startswith(("mysql", "mariadb")) else {}
    engine = create_engine(url, connect_args=args)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(select(NodeGroup.name)).scalars())
    finally:
        engine.dispose()
