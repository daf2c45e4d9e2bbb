"""The Consul agent watch file `installConfig manager` renders for consul envs.

    render_watch_config(prepared)   [RenderedFile] for a manager whose registry is consul,
                                    [] otherwise
    is_rendered_watch(text)         whether a file's text is such a watch (what
                                    `aysManager uninstall --purge` may remove)

`<conf_dir>/consul-watch-ays.json` (mode 0640: it holds the manager's access token, and the
Consul ACL token when the env has one) comes from `templates/config/consul-watch-ays.json.j2`
and is checked to parse back into exactly the watch it must describe: a `key` watch on
`<kv_prefix>/nodelist` whose HTTP handler POSTs to the manager's
/api/v1/registry/consul/watch with `Authorization: Bearer <access token>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ays_installer.render import Prepared, _template_line
from ays_installer.resources import templates_dir
from ays_runtime.config import ConsulRegistrySettings
from ays_runtime.exceptions import ConfigError

WATCH_FILE = "consul-watch-ays.json"
TEMPLATE = f"{WATCH_FILE}.j2"
WATCH_PATH = "/api/v1/registry/consul/watch"  # ays_runtime.manager.registry_api.WATCH_PATH
HANDLER_TIMEOUT = "10s"


@dataclass(frozen=True)
class RenderedFile:
    path: Path
    text: str
    secrets: frozenset[str]  # values to mask in a --dry-run diff, in every form they take


def render_watch_config(prepared: Prepared) -> list[RenderedFile]:
    registry = prepared.config.registry
    if prepared.role != "manager" or not isinstance(registry, ConsulRegistrySettings):
        return []
    access_token = prepared.config.access_token.get_secret_value()
    if not access_token:
        raise ConfigError(
            f"{prepared.source}: field access_token is empty; the Consul watch must present "
            "it to the manager: set access_token (e.g. ${AYS_ACCESS_TOKEN})"
        )
    manager = prepared.config.manager
    host = f"[{manager.ip}]" if ":" in manager.ip else manager.ip
    consul_token = registry.token.get_secret_value() if registry.token else None
    context: dict[str, Any] = {
        "key": f"{registry.kv_prefix.strip('/')}/nodelist",
        "datacenter": registry.datacenter,
        "consul_token": consul_token,
        "url": f"http://{host}:{manager.port}{WATCH_PATH}",
        "authorization": f"Bearer {access_token}",
        "timeout": HANDLER_TIMEOUT,
    }
    text = _render(context)
    _check(text, context)
    secrets = {s for s in (access_token, consul_token) if s}
    return [
        RenderedFile(
            Path(manager.conf_dir) / WATCH_FILE,
            text,
            frozenset(secrets | {json.dumps(s)[1:-1] for s in secrets}),
        )
    ]


def _render(context: dict[str, Any]) -> str:
    folder = templates_dir() / "config"
    template_path = folder / TEMPLATE
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,  # a missing value is an error, never ""
        autoescape=False,  # JSON: values are quoted by tojson
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    try:
        return environment.get_template(TEMPLATE).render(context)
    except jinja2.TemplateNotFound:
        raise ConfigError(f"{template_path}: no such template") from None
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(
            f"{err.filename or template_path}: line {err.lineno}: {err.message}"
        ) from None
    except jinja2.TemplateError as err:
        line = _template_line(err, template_path)
        raise ConfigError(f"{template_path}: line {line}: {err.message}") from None


def _check(text: str, context: dict[str, Any]) -> None:
    """The rendered file must be exactly the watch Consul needs, or nothing is written."""
    where = templates_dir() / "config" / TEMPLATE
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{where}: does not render JSON (line {err.lineno}: {err.msg}); fix the template"
        ) from None
    if data != _watches(context):
        raise ConfigError(
            f"{where}: renders a different watch than the key watch on {context['key']} "
            "posting to the manager; fix the template"
        )


def _watches(context: dict[str, Any]) -> dict[str, Any]:
    """The parsed JSON of the watch file for `context` (the template's values)."""
    watch: dict[str, Any] = {"type": "key", "key": context["key"]}
    if context["datacenter"] is not None:
        watch["datacenter"] = context["datacenter"]
    if context["consul_token"] is not None:
        watch["token"] = context["consul_token"]
    watch["handler_type"] = "http"
    watch["http_handler_config"] = {
        "path": context["url"],
        "method": "POST",
        "header": {"Authorization": [context["authorization"]]},
        "timeout": context["timeout"],
    }
    return {"watches": [watch]}


def is_rendered_watch(text: str) -> bool:
    """Whether `text` is a watch file as installConfig renders it, whatever its values: one
    key watch on `<kv_prefix>/nodelist` POSTing to a manager's WATCH_PATH with a bearer
    token, nothing else. A file an operator wrote or extended there is not."""
    try:
        data = json.loads(text)
        watch = data["watches"][0]
        handler = watch["http_handler_config"]
        context = {
            "key": watch["key"],
            "datacenter": watch.get("datacenter"),
            "consul_token": watch.get("token"),
            "url": handler["path"],
            "authorization": handler["header"]["Authorization"][0],
            "timeout": handler["timeout"],
        }
    except (ValueError, TypeError, KeyError, IndexError):
        return False
    return (
        data == _watches(context)
        and isinstance(context["key"], str)
        and context["key"].endswith("/nodelist")
        and isinstance(context["url"], str)
        and context["url"].startswith("http://")
        and context["url"].endswith(WATCH_PATH)
        and isinstance(context["authorization"], str)
        and context["authorization"].startswith("Bearer ")
    )


def secrets_in(text: str | None) -> set[str]:
    """The secrets an installed watch file holds (the bearer token, the Consul ACL token),
    in both their plain and JSON-escaped forms; none when `text` is not such a file."""
    try:
        watches = json.loads(text or "")["watches"]
    except (ValueError, TypeError, KeyError):
        return set()
    found: set[str] = set()
    for watch in watches if isinstance(watches, list) else []:
        if not isinstance(watch, dict):
            continue
        if isinstance(watch.get("token"), str):
            found.add(watch["token"])
        header = (watch.get("http_handler_config") or {}).get("header") or {}
        for value in header.get("Authorization") or [] if isinstance(header, dict) else []:
            if isinstance(value, str):
                found.add(value.removeprefix("Bearer ").strip())
    found.discard("")
    return found | {json.dumps(s)[1:-1] for s in found}
