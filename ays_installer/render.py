"""Rendering a role's config file for `installConfig`.

    prepare(env, role, ...)      the env file, resolved: CLI values applied, dirs staged
    render_config(prepared)      the file's text, through `templates/config/ROLE.yaml.j2`,
                                 checked to load back into the same EnvConfig
    write_atomic(path, text, mode)  temp file in the same directory, then rename
    masked_diff(old, new, ...)   what --dry-run prints: a unified diff with secrets masked

The rendered file is a complete EnvConfig: every setting, secrets read from the environment,
directories absolute. The daemons load it with `--config FILE` without needing the env file or
the secrets' environment variables.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import stat
import tempfile
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import jinja2
import pydantic
import yaml
from pydantic import BaseModel, SecretStr

from ays_installer.resources import env_file, envs_dir, load_env, templates_dir
from ays_runtime.alerts.settings import AlertSettings
from ays_runtime.config import (
    _PLACEHOLDER,  # the one definition of what a ${VAR} placeholder looks like
    EnvConfig,
    ManagerSettings,
    NodeSettings,
    parse_config,
    read_yaml,
)
from ays_runtime.exceptions import ConfigError

Role = Literal["manager", "node"]
ROLES: tuple[Role, ...] = ("manager", "node")
CONFIG_MODE = 0o640  # the file holds secrets: owner writes, the service's group reads
DIR_FIELDS = ("conf_dir", "log_dir", "data_dir")
MASK = "********"


@dataclass(frozen=True)
class Prepared:
    """What `installConfig ROLE` will write, before any of it is written."""

    role: Role
    config: EnvConfig
    source: Path  # the env file it came from
    secrets: frozenset[str]  # values read from the environment for ${VAR} placeholders

    @property
    def section(self) -> ManagerSettings | NodeSettings:
        return self.config.manager if self.role == "manager" else self.config.node

    @property
    def path(self) -> Path:
        return Path(self.section.conf_dir) / f"{self.role}.yaml"

    @property
    def dirs(self) -> list[Path]:
        """The role's conf, log and data directories."""
        return [Path(getattr(self.section, name)) for name in DIR_FIELDS]


def prepare(
    env: str,
    role: Role,
    *,
    ip: str | None = None,
    port: int | None = None,
    group: str | None = None,
    root: Path | None = None,
    managers: list[tuple[str, int]] | None = None,
) -> Prepared:
    """Load env `env` and apply the command line: -p/-P (and -g for a node) set the role's
    address (and group); `root` prefixes every directory of both roles, so a staged install
    is self-contained; a node's `managers` (-m) say where it reaches the manager: the first
    becomes the manager section's address, and two or more are the node's `managers` (one
    empties that list).
    Raises ConfigError naming the file, field and what was expected."""
    source = env_file(env, root)
    config = load_env(str(source))
    given: dict[str, Any] = {"ip": ip, "port": port, "group": group if role == "node" else None}
    if role == "node" and managers:  # one: the manager section says it; several: the list
        listed = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in managers]
        given["managers"] = listed if len(listed) > 1 else []
    own = {name: value for name, value in given.items() if value is not None}
    sections: dict[str, BaseModel] = {}
    for name in ROLES:
        section = getattr(config, name)
        dirs = {field: getattr(section, field) for field in DIR_FIELDS}
        for field, value in dirs.items():
            if not os.path.isabs(value):
                raise ConfigError(
                    f"{source}: field {name}.{field}: {value!r} is not an absolute path; "
                    f"give an absolute path (e.g. /var/lib/ays)"
                )
        staged = {f: _under(root, v) for f, v in dirs.items()} if root is not None else {}
        overrides = own if name == role else {}
        if name == "manager" and role == "node" and managers:
            overrides = {"ip": managers[0][0], "port": managers[0][1]}
        sections[name] = _replace(section, name, staged | overrides)
    if role == "node":  # alerts are the manager's: a node's file holds none of their secrets
        sections["alerts"] = AlertSettings()
    config = config.model_copy(update=sections)
    return Prepared(role, config, source, frozenset(_placeholder_values(read_yaml(source))))


def render_config(prepared: Prepared) -> str:
    """The text of the role's config file. Raises ConfigError if the template fails or renders
    something that does not load back into exactly `prepared.config`."""
    folder = templates_dir() / "config"
    template_path = folder / f"{prepared.role}.yaml.j2"
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,  # a missing value is an error, never ""
        autoescape=False,  # YAML, not HTML: values are quoted by yaml_value instead
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    config = prepared.config
    settings = _settings(config)
    context = {
        "role": prepared.role,
        "env": config.env,
        "source": _shown_source(prepared.source),
        "top": {s.name: s for s in settings if not s.is_section},
        "sections": {
            s.name: _settings(getattr(config, s.name), top=False) for s in settings if s.is_section
        },
    }
    try:
        text = environment.get_template(template_path.name).render(context)
    except jinja2.TemplateNotFound:
        raise ConfigError(f"{template_path}: no such template") from None
    except jinja2.TemplateSyntaxError as err:
        where = err.filename or template_path
        raise ConfigError(f"{where}: line {err.lineno}: {err.message}") from None
    except jinja2.TemplateError as err:
        line = _template_line(err, template_path)
        raise ConfigError(f"{template_path}: line {line}: {err.message}") from None
    _check_loads_back(text, prepared, template_path)
    return text


def _shown_source(path: Path) -> str:
    """The env file as the rendered file's header names it: the bundled ones by their
    place in a checkout or tarball, an operator's own by its full path."""
    bundled = envs_dir().resolve()
    if path.resolve().parent == bundled:
        return f"envs/{path.name}"
    return str(path.absolute())


def write_atomic(path: Path, text: str, mode: int, *, gid: int | None = None) -> bool:
    """Make `path` hold `text` with `mode` (and group `gid`); return whether anything changed.

    The new content goes to a temp file in the same directory, which is fsynced and renamed
    over `path`: a reader sees the old file or the new one, never half of either, and a
    failure removes the temp file. An identical file is left alone (its mtime included).
    """
    data = text.encode("utf-8")
    if _same_file(path, data, mode, gid):
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # before any byte is written; umask does not apply
            if gid is not None:
                os.fchown(f.fileno(), -1, gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return True


def read_installed(path: Path) -> str | None:
    """The installed file's text, or None when there is none yet."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def masked_diff(old: str, new: str, path: Path, secrets: Iterable[str] = ()) -> str:
    """A unified diff from `old` to `new` in which no secret shows: the values of secret
    settings (in either text), any value in `secrets`, and URL passwords become ********."""
    hidden = set(secrets) | _secrets_in(_yaml_or_none(old)) | _secrets_in(_yaml_or_none(new))
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"{path} (installed)",
        tofile=f"{path} (rendered)",
    )
    return "".join(mask(line if line.endswith("\n") else line + "\n", hidden) for line in lines)


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value, every secret setting's value and URL passwords masked."""
    # A secret shows in the file as written by yaml_value (quoted, with escapes), or
    # percent-encoded inside a URL.
    forms = {form for s in secrets if s for form in (s, yaml_value(s)[1:-1], quote(s, safe=""))}
    for secret in sorted(forms, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _SECRET_SETTING_LINE.sub(rf"\g<1>{MASK}", text)
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)


# -- the settings as the template sees them ------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    value: str  # one line of YAML that loads back to the value ("" for a section)
    doc: str  # the field's description in the schema
    is_section: bool = False


def _settings(model: BaseModel, top: bool = True) -> list[Setting]:
    """The settings of `model`: at the top, a model is a section; inside a section, one
    flow mapping on its line (console.oidc)."""
    result = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        doc = " ".join((info.description or "").split())
        if isinstance(value, BaseModel) and top:
            result.append(Setting(name, "", doc, is_section=True))
        else:
            result.append(Setting(name, yaml_value(value), doc))
    return result


def yaml_value(value: object) -> str:
    """`value` as one line of YAML that loads back to it; strings are always double-quoted,
    so a secret holding `: #"'` or a newline cannot change the file's structure."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, BaseModel):  # an item of a list setting (an alert channel, a rule)
        value = {name: getattr(value, name) for name in type(value).model_fields}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return yaml.safe_dump(value, default_style='"', width=float("inf")).rstrip("\n")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_value(k)}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return yaml.safe_dump(value, width=float("inf")).partition("\n")[0]


# -- checks ----------------------------------------------------------------------------------


def _replace(section: BaseModel, name: str, changes: dict[str, Any]) -> BaseModel:
    """`section` with `changes`, validated by the schema's own rules."""
    try:
        return type(section).model_validate(section.model_dump() | changes)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ConfigError(f"command line: {problems}") from None


def _under(root: Path, directory: str) -> str:
    return os.path.normpath(os.path.join(os.path.abspath(root), directory.lstrip("/")))


def _check_loads_back(text: str, prepared: Prepared, template: Path) -> None:
    data = _yaml_or_none(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{template}: does not render a YAML mapping; fix the template")
    missing = [name for name in EnvConfig.model_fields if name not in data]
    if missing:
        raise ConfigError(
            f"{template}: does not write {', '.join(missing)}; the rendered file must hold "
            f"every setting"
        )
    for where, value in _strings(data):
        if _PLACEHOLDER.search(value):
            raise ConfigError(
                f"{prepared.source}: field {where}: the value read from the environment holds "
                f"a ${{NAME}} placeholder, which would be expanded again when the file is "
                f"loaded; set the variable to the value itself"
            )
    loaded = parse_config(data, str(template))
    if loaded != prepared.config:
        differing = ", ".join(_differences(loaded.model_dump(), prepared.config.model_dump()))
        raise ConfigError(
            f"{template}: the rendered file loads back with different {differing}; fix the template"
        )


def _template_line(err: Exception, template: Path) -> int | str:
    """The template line a rendering error happened on (Jinja2 puts template frames into the
    traceback with the template's file name)."""
    line: int | str = "?"
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(template):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _differences(a: Any, b: Any, where: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            yield from _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    elif a != b:
        yield where or "<top>"


def _strings(data: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(data, str):
        yield where, data


# -- secrets -------------------------------------------------------------------------------


def _secret_names(model: type[BaseModel]) -> set[str]:
    """Names of the settings typed SecretStr, anywhere in the schema."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        for kind in _kinds(info.annotation):
            if kind is SecretStr:
                names.add(name)
            elif isinstance(kind, type) and issubclass(kind, BaseModel):
                names |= _secret_names(kind)
    return names


def _kinds(annotation: Any) -> Iterator[Any]:
    origin = typing.get_origin(annotation)
    if isinstance(annotation, types.UnionType) or origin in (typing.Union, list):
        for arg in typing.get_args(annotation):
            yield from _kinds(arg)
    elif origin is typing.Annotated:  # the type, not its metadata (an alert channel's union)
        yield from _kinds(typing.get_args(annotation)[0])
    else:
        yield annotation


SECRET_SETTINGS = frozenset(_secret_names(EnvConfig))
# A URL's password is the secret, not the whole URL: its host stays readable in a diff.
_URL_PASSWORD = re.compile(r"(://[^\s:/@\"']*:)(\S*)@")  # to the last @
_SECRET_SETTING_LINE = re.compile(
    r"^([-+ ]?[ \t]*(?:" + "|".join(sorted(n for n in SECRET_SETTINGS if n != "url")) + r"):[ \t]*)"
    r"(?!(?:null|\"\"|'')[ \t]*$)\S[^\n]*",
    re.MULTILINE,
)


def _secrets_in(data: Any) -> set[str]:
    """The secret values in a parsed config mapping: secret settings, URL passwords."""
    found: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            if key in SECRET_SETTINGS and isinstance(value, str):
                if key != "url":
                    found.add(value)
                elif match := _URL_PASSWORD.search(value):
                    found.add(match.group(2))
            else:
                found |= _secrets_in(value)
    elif isinstance(data, list):
        for value in data:
            found |= _secrets_in(value)
    return found


def _placeholder_values(data: Any) -> Iterator[str]:
    """The environment's values for the ${VAR} placeholders in an env file's strings."""
    for _, value in _strings(data):
        for name in _PLACEHOLDER.findall(value):
            if os.environ.get(name):
                yield os.environ[name]


def _yaml_or_none(text: str) -> Any:
    """Parsed YAML, or None: a parse error's message quotes the line, which may hold a secret."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _same_file(path: Path, data: bytes, mode: int, gid: int | None) -> bool:
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) != mode or (gid is not None and st.st_gid != gid):
            return False
        return path.read_bytes() == data
    except FileNotFoundError:
        return False
