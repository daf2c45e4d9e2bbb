"""The env-file schema: every setting declared once, with its type, default and meaning.

An env file (`envs/NAME.yaml`) describes one environment. Strings may hold `${VAR}`
placeholders, read from the process environment when the file is loaded; a missing variable
is a `MissingSecretError` naming it and the field it sits in. A placeholder in the user or
password part of `storage.url` is percent-encoded as it is filled in, so a password may hold
`@ : /` as it is. An error about a field filled from a placeholder names the variable.
`installConfig` renders a role's config from the same model (resolved, absolute paths), and
the daemons load either an env file (`-e ENV`) or a rendered file (`--config FILE`) into this
same `EnvConfig`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ays_runtime.alerts.settings import AlertSettings
from ays_runtime.exceptions import ConfigError, MissingSecretError

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# The settings whose values are URLs: a placeholder in their user:password@ is percent-encoded.
_URL_SETTINGS = frozenset({"storage.url"})
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@")
# Env names become file names and service names: keep them plain.
ENV_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(_Section):
    url: SecretStr = Field(
        description="SQLAlchemy URL. `{data_dir}` is replaced by the manager's data dir, "
        "e.g. sqlite:///{data_dir}/ays.db or mysql+pymysql://ays:${AYS_DB_PASSWORD}@db/ays"
    )
    pool_size: int = Field(10, ge=1, le=200, description="connections kept open (not SQLite)")

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, v: SecretStr) -> SecretStr:
        url = v.get_secret_value()
        scheme = url.split(":", 1)[0]
        if scheme not in {"sqlite", "mysql+pymysql", "mariadb+pymysql"}:
            raise ValueError(
                f"unsupported database scheme {scheme!r}: use sqlite:/// or mysql+pymysql://"
            )
        if scheme != "sqlite":
            _check_server_url(url)
        return v


def _check_server_url(url: str) -> None:
    """A database server URL SQLAlchemy reads as written; the message never quotes it (it
    holds the password)."""
    from sqlalchemy.engine import make_url  # SQLAlchemy's own reading, as the engine will do

    fix = (
        "a user or password holding @ : / must be percent-encoded (%40 %3A %2F) when written "
        "in the URL; one given as ${AYS_DB_PASSWORD} is encoded by Ays"
    )
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValueError(f"cannot be read as a database URL: {fix}") from None
    if not parsed.host or "@" in parsed.host:
        raise ValueError(f"cannot be read as a database URL (no host after the @): {fix}")


def check_header_text(value: str) -> str:
    """A credential sent as an HTTP header value: printable ASCII without spaces."""
    bad = next((c for c in value if not "!" <= c <= "~"), None)
    if bad is not None:
        kind = "a space" if bad == " " else "non-ASCII" if ord(bad) > 127 else "a control char"
        raise ValueError(
            f"holds {kind} (character {ord(bad):#x}); it is sent in an HTTP header, so it may "
            "only hold printable ASCII without spaces, e.g. the output of "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


class BuiltinRegistrySettings(_Section):
    backend: Literal["builtin"]
    heartbeat_interval: float = Field(10.0, gt=0, description="seconds between node heartbeats")
    offline_after_missed: int = Field(
        3, ge=1, description="missed heartbeats before the manager marks a node offline"
    )


class ConsulRegistrySettings(_Section):
    backend: Literal["consul"]
    host: str = Field("127.0.0.1", description="Consul agent host")
    port: int = Field(8500, ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    token: SecretStr | None = Field(None, description="ACL token (sent as a header, never logged)")

    @field_validator("token")
    @classmethod
    def _header_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            check_header_text(v.get_secret_value())
        return v

    kv_prefix: str = Field("ays", pattern=r"^[A-Za-z0-9,\-_./]+$", description="KV root of Ays")
    datacenter: str | None = None
    service_name: str = Field("aysnode", pattern=r"^[A-Za-z0-9-]+$")
    check_interval: float = Field(10.0, gt=0, description="seconds between health checks")
    check_timeout: float = Field(5.0, gt=0)
    deregister_after: float = Field(
        300.0, ge=60, description="DeregisterCriticalServiceAfter, seconds (Consul minimum 60)"
    )
    leave_nodelist_on_stop: bool = Field(
        False, description="a cleanly stopped node also removes itself from the KV node list"
    )


class BuiltinTransportSettings(_Section):
    backend: Literal["builtin"]
    dispatch_timeout: float = Field(5.0, gt=0, description="seconds to wait for a node to accept")


class RocketMQTransportSettings(_Section):
    backend: Literal["rocketmq"]
    endpoints: list[str] = Field(min_length=1, description="proxy gRPC endpoints host:port")
    access_key: str | None = None
    secret_key: SecretStr | None = None
    namespace: str = ""
    topic_prefix: str = Field(
        "ays_",
        pattern=r"^[A-Za-z0-9_%|-]*$",
        description="node group G uses topics <prefix>G (jobs) and <prefix>G_bcast (broadcast)",
    )
    result_topic: str = Field("ays_result", pattern=r"^[A-Za-z0-9_%|-]+$")
    name_server: str = Field(
        "", description="name server host:port, only for the mqadmin commands Ays suggests"
    )
    cluster: str = Field(
        "DefaultCluster", description="broker cluster, only for the mqadmin commands Ays suggests"
    )


class ManagerSettings(_Section):
    ip: str = Field("127.0.0.1", description="address the manager listens on and advertises")
    port: int = Field(18080, ge=1, le=65535)
    conf_dir: str = "/etc/ays"
    log_dir: str = "/var/log/ays"
    data_dir: str = "/var/lib/ays"
    user: str = Field("ays", description="system user the service runs as")
    reconcile_interval: float = Field(5.0, gt=0, description="seconds between reconcile ticks")
    misfire_grace: float = Field(
        5.0, ge=0, description="seconds a fire may be late before the misfire policy applies"
    )
    ledger_horizon: float = Field(
        86400.0,
        gt=0,
        le=31 * 86400,
        description="seconds a starting manager looks back for slots no manager fired (the "
        "slot ledger's `missed` ranges); older ones are not recorded",
    )
    claim_ahead: float = Field(
        1.0,
        ge=0,
        le=5,
        description="seconds before its slot a run is claimed (its row committed); it is "
        "sent when the slot comes. Keeps the commit off the path from slot to dispatch. A "
        "second holding more slots than this time claims (planned at 10,000 a second) starts "
        "earlier, up to 5 s before it: a burst of 100,000 tasks on `0 * * * * *` is "
        "committed by its slot. A change to a task within this time before a slot applies "
        "from the next slot; disabling or deleting it up to 0.5 s before the slot still "
        "stops the claimed run. 0 claims each slot when it is due",
    )
    adopt_after: float = Field(
        60.0,
        gt=0,
        description="seconds a peer manager may be silent before this one adopts its pending "
        "runs (claimed but never sent, retries waiting)",
    )
    beat_interval: float = Field(
        2.0,
        gt=0,
        le=60,
        description="seconds between this manager's liveness beats (its ays_manager row); "
        "each beat also reads which managers are live, so shares move on the next one",
    )
    silent_after: float = Field(
        6.0,
        gt=0,
        le=600,
        description="seconds without a beat after which a manager counts as gone and its "
        "tasks move to the live ones (at least twice beat_interval). A silent manager's "
        "tasks fire again within silent_after + beat_interval + one reconcile",
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=65_536,
        description="largest request body the manager's API takes (bytes); a larger one is "
        "refused with 413 before it is read. Result batches have their own limit",
    )
    max_result_body_bytes: int = Field(
        16_777_216,
        ge=1_048_576,
        description="largest body of a node's results (POST /job-logs/results and "
        "/job-logs/{id}/result), in bytes; a node sends a batch that is refused one by one",
    )

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        return check_ip(v)

    @model_validator(mode="after")
    def _silent_after_two_beats(self) -> ManagerSettings:
        if self.silent_after < 2 * self.beat_interval:
            raise ValueError(
                f"silent_after ({self.silent_after:g}) must be at least twice beat_interval "
                f"({self.beat_interval:g}), so that one late beat does not move the shares: "
                "raise manager.silent_after or lower manager.beat_interval"
            )
        return self


class NodeSettings(_Section):
    ip: str = "127.0.0.1"
    port: int = Field(18181, ge=1, le=65535)
    group: str | None = Field(None, description="node group the executor joins (or -g)")
    managers: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="the managers the node beats and reports to, IP:PORT each ([IPv6]:PORT), "
        "any one that answers will do; empty: manager.ip:manager.port. The node also learns "
        "the other managers alive on the same database from their heartbeat answers",
    )
    conf_dir: str = "/etc/ays"
    log_dir: str = "/var/log/ays"
    data_dir: str = "/var/lib/ays-node"
    user: str = "ays"
    max_concurrent_jobs: int = Field(8, ge=1, description="jobs run at once; more wait")
    output_cap_bytes: int = Field(1_048_576, ge=1024, description="output kept per run")
    kill_grace: float = Field(5.0, ge=0, description="seconds between SIGTERM and SIGKILL")
    max_body_bytes: int = Field(
        16_777_216,
        ge=1_048_576,
        description="largest request body the node's API takes (bytes; a batch of runs); a "
        "larger one is refused with 413 before it is read, and the manager sends its runs "
        "one by one",
    )
    start_claim_wait: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="seconds a run waits for a manager to record its start (the start claim) "
        "before it is given up unrun and reported failed",
    )

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        return check_ip(v)

    @field_validator("managers")
    @classmethod
    def _managers(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(manager_address(a) for a in v))


def manager_address(value: str) -> str:
    """`IP:PORT` (an IPv6 address in brackets) as written the one way Ays writes it."""
    host, sep, port = str(value).strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not IP:PORT (e.g. 172.21.16.81:18080)")
    ip = check_ip(host.removeprefix("[").removesuffix("]"))
    check_port(int(port))
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{int(port)}"


class JobLogSettings(_Section):
    retention_days: float = Field(30.0, gt=0, description="job logs older than this are purged")
    excerpt_bytes: int = Field(
        16_384,
        ge=256,
        le=60_000,
        description="output stored in the job log row (MySQL TEXT: 64 KB)",
    )
    purge_batch: int = Field(1000, ge=1, description="rows deleted per purge statement")


class OidcRoleMapping(_Section):
    """One value of the roles claim and what it grants."""

    value: str = Field(min_length=1, description="a value of the claim (e.g. a group name)")
    role: Literal["admin", "operator", "viewer"]
    groups: list[str] = Field(
        default_factory=list, description="for an operator: the node groups granted"
    )

    @model_validator(mode="after")
    def _operator_groups(self) -> OidcRoleMapping:
        if self.role == "operator" and not self.groups:
            raise ValueError(
                f"mapping of {self.value!r}: an operator needs groups (the node groups granted)"
            )
        if self.role != "operator" and self.groups:
            raise ValueError(f"mapping of {self.value!r}: groups are only for role operator")
        return self


class OidcSettings(_Section):
    """Optional console sign-in with an OpenID Connect provider (ays_runtime/console/oidc.py)."""

    name: str = Field("OIDC", min_length=1, max_length=40, description="shown on the button")
    issuer: str = Field(description="the provider's issuer URL (discovery at /.well-known/...)")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr = Field(description="the client's secret at the provider")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    username_claim: str = Field("preferred_username", description="claim naming the user")
    roles_claim: str = Field("groups", min_length=1, description="claim holding roles/groups")
    mapping: list[OidcRoleMapping] = Field(min_length=1)
    default_role: Literal["refuse", "viewer"] = Field(
        "refuse", description="when no value of the claim maps: refuse sign-in, or viewer"
    )
    redirect_base: str = Field(
        description="the console's URL as the browser reaches it; the provider redirects to "
        "{redirect_base}/login/oidc/callback (register that URL with the client)"
    )

    @field_validator("issuer", "redirect_base")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", v):
            raise ValueError("must be an http(s) URL without query, e.g. https://sso.example.com")
        return v.rstrip("/")

    @field_validator("scopes")
    @classmethod
    def _openid(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("must include openid")
        return v

    @field_validator("client_secret")
    @classmethod
    def _secret_set(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v


class SignInSettings(_Section):
    """Limits on guessing console passwords (ays_runtime/users/lockout.py): failed sign-ins
    are counted per user name and per source address, in the database (so every manager of
    the env counts them together); past a limit, sign-ins of that name or from that address
    are refused, without their password being checked, until the lock-out ends."""

    max_failures_per_account: int = Field(
        5,
        ge=0,
        le=10_000,
        description="failed sign-ins of one user name within `window` after which that "
        "name is locked out; 0: no limit per name",
    )
    max_failures_per_address: int = Field(
        20,
        ge=0,
        le=100_000,
        description="failed sign-ins from one source address (any names) within `window` "
        "after which that address is locked out; 0: no limit per address (when every "
        "browser reaches the manager through one proxy address)",
    )
    window: float = Field(
        900.0,
        gt=0,
        le=7 * 86400,
        description="seconds from a name's (or address's) first counted failure in which "
        "the failures add up; later, counting starts again",
    )
    lockout: float = Field(
        900.0,
        gt=0,
        le=7 * 86400,
        description="seconds a locked-out name or address is refused; then it may sign in "
        "again (an admin ends a name's lock-out sooner: `aysManager user unlock NAME`)",
    )


class ConsoleSettings(_Section):
    """The web console the manager serves at / (ays_runtime/console)."""

    session_hours: float = Field(
        12.0, gt=0, le=24 * 31, description="hours a console sign-in lasts before it asks again"
    )
    secret: SecretStr = Field(
        SecretStr(""),
        description="key that signs console sessions; empty: derived from access_token (a "
        "new token then ends every session). Set the same value on every manager of an env",
    )
    secure_cookie: bool = Field(
        False,
        description="mark the session cookie Secure: set it when the console is reached "
        "through HTTPS (a TLS proxy), never on plain HTTP (the browser would drop it)",
    )
    oidc: OidcSettings | None = Field(
        None, description="optional sign-in with an OpenID Connect provider; none: off"
    )
    sign_in: SignInSettings = Field(
        SignInSettings(), description="limits on failed password sign-ins (lock-outs)"
    )


class MetricsSettings(_Section):
    public: bool = Field(
        False,
        description="GET /metrics (manager and nodes) answers without the access token; "
        "false: Prometheus sends it (authorization: credentials in its scrape config)",
    )
    task_labels: bool = Field(
        False,
        description="also count runs per task (ays_task_runs_finished_total{task_id}): one "
        "series per task and status, so only for envs with few tasks",
    )
    firing: bool = Field(
        True,
        description="count and time fires on the firing path (ays_fires_claimed_total, "
        "ays_fire_lateness_seconds at claim, dispatch and store); false turns that off (the "
        "other series stay); bench/alerts_bench.py measures what it costs",
    )


class AuditSettings(_Section):
    retention_days: float = Field(
        365.0, gt=0, description="audit-trail entries older than this are purged"
    )


RegistrySettings = Annotated[
    BuiltinRegistrySettings | ConsulRegistrySettings, Field(discriminator="backend")
]
TransportSettings = Annotated[
    BuiltinTransportSettings | RocketMQTransportSettings, Field(discriminator="backend")
]


class EnvConfig(_Section):
    env: str = Field(description="environment name; equals the env file's stem")
    access_token: SecretStr = Field(
        SecretStr(""),
        description="shared secret for the manager API and node API; empty only in dev, "
        "where the manager generates one on first start",
    )
    cluster_secret: SecretStr = Field(
        SecretStr(""),
        description="secret managers and nodes present to each other (dispatch, heartbeats, "
        "results); nodes take no other credential. Empty only in dev, where the manager "
        "generates one on first start",
    )
    storage: StorageSettings
    registry: RegistrySettings
    transport: TransportSettings
    manager: ManagerSettings = ManagerSettings()
    node: NodeSettings = NodeSettings()
    job_log: JobLogSettings = JobLogSettings()
    metrics: MetricsSettings = MetricsSettings()
    alerts: AlertSettings = AlertSettings()
    audit: AuditSettings = AuditSettings()
    console: ConsoleSettings = ConsoleSettings()

    @field_validator("access_token", "cluster_secret")
    @classmethod
    def _header_token(cls, v: SecretStr) -> SecretStr:
        check_header_text(v.get_secret_value())
        return v

    @field_validator("env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not ENV_NAME.match(v):
            raise ValueError("lowercase letters, digits, - and _, starting with a letter")
        return v

    @property
    def is_dev(self) -> bool:
        return self.env == "dev"

    def storage_url(self) -> str:
        """The SQLAlchemy URL with `{data_dir}` filled in (holds the password: never log it)."""
        return self.storage.url.get_secret_value().replace("{data_dir}", self.manager.data_dir)


def check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (e.g. 172.21.16.81)") from None


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} is not a port number (1-65535)")
    return value


def expand_placeholders(data: Any, source: str, path: str = "", environ: Any = None) -> Any:
    """Replace `${VAR}` in every string of `data` from `environ` (default: os.environ); in the
    user:password@ part of a URL setting, the value is percent-encoded. Raises
    MissingSecretError naming every variable that is not set, each with its field, so that
    one run tells an operator all there is to export."""
    env = os.environ if environ is None else environ
    missing: list[tuple[str, str]] = []  # (field, variable)
    expanded = _expand(data, source, path, env, missing)
    if missing:
        names = tuple(dict.fromkeys(name for _, name in missing))
        fields = "; ".join(
            f"field {field}: environment variable {name} is not set" for field, name in missing
        )
        exports = " ".join(f"{name}=..." for name in names)
        raise MissingSecretError(
            f"{source}: {fields}; export {exports} before running this command", names
        )
    return expanded


def _expand(data: Any, source: str, path: str, env: Any, missing: list[tuple[str, str]]) -> Any:
    if isinstance(data, dict):
        return {
            k: _expand(v, source, f"{path}.{k}" if path else str(k), env, missing)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_expand(v, source, f"{path}[{i}]", env, missing) for i, v in enumerate(data)]
    if isinstance(data, str):
        userinfo = _URL_USERINFO.match(data) if path in _URL_SETTINGS else None

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                missing.append((path, name))
                return ""
            value: str = env[name]
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # os.environ keeps undecodable bytes as surrogates
                raise ConfigError(
                    f"{source}: field {path}: environment variable {name} is not UTF-8 text; "
                    f"set it again (export {name}=...)"
                ) from None
            if userinfo is not None and match.end() <= userinfo.end(1):
                return quote(value, safe="")
            return value

        return _PLACEHOLDER.sub(sub, data)
    return data


def placeholder_sources(data: Any, path: str = "") -> dict[str, list[str]]:
    """Where `${VAR}` placeholders sit in `data`: dotted field path -> the variables."""
    found: dict[str, list[str]] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            found |= placeholder_sources(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found |= placeholder_sources(value, f"{path}[{i}]")
    elif isinstance(data, str) and (names := _PLACEHOLDER.findall(data)):
        found[path] = names
    return found


def _format_validation_error(
    source: str, err: pydantic.ValidationError, sources: dict[str, list[str]]
) -> str:
    lines = [f"{source}: invalid configuration:"]
    for e in err.errors():
        loc = ".".join(
            str(p)
            for p in e["loc"]
            if not str(p).startswith("function-") and p not in {"builtin", "consul", "rocketmq"}
        )
        # Secrets must not be echoed back, even when wrong; nor a whole mapping or list (a
        # missing field's input is the section around it, secrets and all).
        shown = (
            ""
            if any(word in loc for word in ("url", "token", "key", "password", "secret"))
            or isinstance(e.get("input"), dict | list)
            else f" (got {e.get('input')!r})"
        )
        names = sources.get(loc)
        origin = f" (from {', '.join('$' + n for n in names)})" if names else ""
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '<top>'}{origin}: {message}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, source: str) -> EnvConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a YAML mapping at the top, got {type(data).__name__}"
        )
    try:
        return EnvConfig.model_validate(expand_placeholders(data, source))
    except pydantic.ValidationError as err:
        message = _format_validation_error(source, err, placeholder_sources(data))
        raise ConfigError(message) from None


def read_yaml(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"{path}: line {line}, column {column}: byte {raw[err.start]:#04x} is not UTF-8; "
            "save the file as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_config_file(path: Path) -> EnvConfig:
    """Load an env file or a rendered config file."""
    return parse_config(read_yaml(path), str(path))
