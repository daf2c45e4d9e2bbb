"""The env-file schema (ays_runtime.config) and the env files shipped in envs/."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from ays_installer.resources import known_envs, load_env
from ays_runtime.config import (
    EnvConfig,
    check_ip,
    check_port,
    expand_placeholders,
    load_config_file,
    parse_config,
)
from ays_runtime.exceptions import ConfigError, MissingSecretError
from ays_runtime.storage.database import redacted

SECRETS = {
    "AYS_ACCESS_TOKEN": "tok-5b1e0c9d",
    "AYS_CLUSTER_SECRET": "tok-5b1e0c9d-cluster",
    "AYS_DB_PASSWORD": "pw-77aa31f0",
    "AYS_CONSUL_TOKEN": "consul-9c0de4",
    "AYS_ROCKETMQ_SECRET": "rmq-1f2e3d",
}


def minimal(**extra: object) -> dict[str, object]:
    return {
        "env": "test",
        "storage": {"url": "sqlite:///{data_dir}/ays.db"},
        "registry": {"backend": "builtin"},
        "transport": {"backend": "builtin"},
        **extra,
    }


@pytest.fixture
def secrets_set(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return SECRETS


@pytest.mark.parametrize("name", ["dev", "uat", "prod"])
def test_every_shipped_env_file_loads_once_its_secrets_are_set(
    name: str, secrets_set: dict[str, str]
) -> None:
    config = load_env(name)
    assert config.env == name


def test_the_shipped_envs_are_dev_uat_and_prod() -> None:
    assert {"dev", "uat", "prod"} <= set(known_envs())


def test_dev_needs_no_servers_and_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    config = load_env("dev")
    assert config.is_dev
    assert config.registry.backend == "builtin"
    assert config.transport.backend == "builtin"
    assert config.storage_url() == "sqlite:////var/lib/ays/ays.db"


def test_uat_reads_its_secrets_from_the_environment(secrets_set: dict[str, str]) -> None:
    config = load_env("uat")
    assert config.access_token.get_secret_value() == SECRETS["AYS_ACCESS_TOKEN"]
    assert f"ays:{SECRETS['AYS_DB_PASSWORD']}@" in config.storage_url()
    assert config.registry.backend == "consul"
    assert config.registry.token == SecretStr(SECRETS["AYS_CONSUL_TOKEN"])
    assert config.transport.backend == "rocketmq"
    assert config.transport.secret_key == SecretStr(SECRETS["AYS_ROCKETMQ_SECRET"])


def test_a_secret_does_not_show_in_the_config_repr(secrets_set: dict[str, str]) -> None:
    shown = repr(load_env("uat")) + str(load_env("uat").model_dump(mode="json"))
    for value in SECRETS.values():
        assert value not in shown


def test_a_missing_variable_is_an_error_naming_the_variable_and_the_field(
    secrets_set: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AYS_CONSUL_TOKEN")
    with pytest.raises(MissingSecretError) as caught:
        load_env("uat")
    message = str(caught.value)
    assert "uat.yaml" in message
    assert "registry.token" in message
    assert "AYS_CONSUL_TOKEN" in message


def test_placeholders_are_expanded_inside_lists_and_longer_strings() -> None:
    data = {"a": ["x-${ONE}-y", {"b": "${TWO}${ONE}"}], "n": 3}
    expanded = expand_placeholders(data, "src", environ={"ONE": "1", "TWO": "2"})
    assert expanded == {"a": ["x-1-y", {"b": "21"}], "n": 3}


def test_a_missing_variable_in_a_list_names_its_index() -> None:
    with pytest.raises(MissingSecretError, match=r"field a\[1\]: environment variable NOPE"):
        expand_placeholders({"a": ["ok", "${NOPE}"]}, "src", environ={})


def test_a_bad_value_names_the_file_the_field_path_and_what_was_expected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(manager={"port": "high"}), "envs/test.yaml")
    message = str(caught.value)
    assert message.startswith("envs/test.yaml: invalid configuration:")
    assert "manager.port: Input should be a valid integer" in message
    assert "(got 'high')" in message


def test_an_unknown_setting_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"manager\.prot: Extra inputs are not permitted"):
        parse_config(minimal(manager={"prot": 1}), "envs/test.yaml")


def test_an_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"registry: .*'builtin', 'consul'"):
        parse_config(minimal(registry={"backend": "zookeeper"}), "envs/test.yaml")


def test_a_bad_database_url_is_refused_without_echoing_it() -> None:
    url = "postgres://ays:hunter2-secret@db/ays"
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(storage={"url": url}), "envs/test.yaml")
    assert "storage.url: unsupported database scheme 'postgres'" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)


def test_a_bad_ip_in_the_env_file_is_shown_with_its_field() -> None:
    with pytest.raises(ConfigError, match=r"node\.ip: .*'10\.0\.0\.300' is not an IP address"):
        parse_config(minimal(node={"ip": "10.0.0.300"}), "envs/test.yaml")


def test_a_file_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected a YAML mapping at the top, got list"):
        parse_config([1, 2], "envs/test.yaml")


def test_a_file_that_is_not_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("env: [dev\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML"):
        load_config_file(path)


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'none.yaml'}: no such file"):
        load_config_file(tmp_path / "none.yaml")


def test_an_unknown_environment_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        load_env("staging")
    message = str(caught.value)
    assert "unknown environment 'staging'" in message
    for name in ("dev", "prod", "uat"):
        assert name in message


def test_an_env_name_that_is_not_a_plain_name_is_unknown() -> None:
    with pytest.raises(ConfigError, match="unknown environment 'Dev!'"):
        load_env("Dev!")


def test_an_env_path_that_is_no_file_is_named_with_the_known_environments() -> None:
    with pytest.raises(ConfigError, match=r"^-e \.\./envs/dev: no such env file; .* known env"):
        load_env("../envs/dev")


def test_an_env_file_whose_env_field_differs_from_its_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "qa.yaml").write_text(
        "env: prod\nstorage: {url: 'sqlite:///x'}\n"
        "registry: {backend: builtin}\n"
        "transport: {backend: builtin}\n"
    )
    monkeypatch.setenv("AYS_RESOURCES", str(tmp_path))
    with pytest.raises(ConfigError, match="field env: is 'prod', must equal the file name 'qa'"):
        load_env("qa")


def test_storage_url_fills_in_the_managers_data_dir() -> None:
    config = EnvConfig.model_validate(minimal(manager={"data_dir": "/srv/ays"}))
    assert config.storage_url() == "sqlite:////srv/ays/ays.db"


@pytest.mark.parametrize(
    ("given", "expected"), [("172.21.16.81", "172.21.16.81"), ("::0001", "::1")]
)
def test_check_ip_accepts_and_normalises_addresses(given: str, expected: str) -> None:
    assert check_ip(given) == expected


@pytest.mark.parametrize("bad", ["999.1.1.1", "host.example", ""])
def test_check_ip_refuses_a_non_address_showing_it(bad: str) -> None:
    with pytest.raises(ValueError, match=f"{bad!r} is not an IP address"):
        check_ip(bad)


@pytest.mark.parametrize("bad", [0, 65536, 70000, -1])
def test_check_port_refuses_a_number_outside_1_to_65535_showing_it(bad: int) -> None:
    with pytest.raises(ValueError, match=f"^{bad} is not a port number"):
        check_port(bad)


def test_secrets_compare_by_value_so_a_reloaded_config_equals_the_original(
    secrets_set: dict[str, str],
) -> None:
    assert load_env("uat") == load_env("uat")


# --- bad config: a clear error, never a traceback or a leak (issue 17) ----------------------


@pytest.mark.parametrize("password", ["Sec@Pass99", "p@ss:w/rd", "a%40b", "x y#z?q"])
def test_a_db_password_given_by_a_placeholder_is_url_encoded_and_read_back_whole(
    monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    monkeypatch.setenv("AYS_DB_PASSWORD", password)
    url = "mysql+pymysql://ays:${AYS_DB_PASSWORD}@db.example.internal:3306/ays"
    config = parse_config(minimal(storage={"url": url}), "envs/test.yaml")
    parsed = make_url(config.storage_url())
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "ays",
        password,
        "db.example.internal",
        3306,
        "ays",
    )
    assert password not in redacted(config.storage_url())


@pytest.mark.parametrize("password", ["Sec@Pass99", "p@ss:w/rd"])
def test_a_url_written_with_a_raw_password_is_refused_without_showing_any_of_it(
    password: str,
) -> None:
    url = f"mysql+pymysql://ays:{password}@db.example.internal:3306/ays"
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(storage={"url": url}), "envs/test.yaml")
    message = str(caught.value)
    assert "storage.url: cannot be read as a database URL" in message
    assert "percent-encoded" in message and "${AYS_DB_PASSWORD}" in message
    for part in (password, password[2:], password[-4:], "Pass99", "w/rd"):
        assert part not in message


@pytest.mark.parametrize(
    ("token", "kind"),
    [("tok\nen", "a control char"), ("tök", "non-ASCII"), ("tok en", "a space"), ("t\x7f", "")],
)
def test_a_token_that_cannot_be_an_http_header_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, token: str, kind: str
) -> None:
    monkeypatch.setenv("AYS_ACCESS_TOKEN", token)
    monkeypatch.setenv("AYS_CONSUL_TOKEN", token)
    data = minimal(
        access_token="${AYS_ACCESS_TOKEN}",
        registry={"backend": "consul", "token": "${AYS_CONSUL_TOKEN}"},
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "envs/test.yaml")
    message = str(caught.value)
    assert "access_token (from $AYS_ACCESS_TOKEN): holds" in message
    assert "registry.token (from $AYS_CONSUL_TOKEN): holds" in message
    assert kind in message and "HTTP header" in message
    assert token not in message


def test_an_env_variable_that_is_not_utf8_is_named() -> None:
    with pytest.raises(ConfigError, match="environment variable AYS_DB_PASSWORD is not UTF-8"):
        expand_placeholders(
            {"storage": {"url": "mysql+pymysql://ays:${AYS_DB_PASSWORD}@db/ays"}},
            "envs/test.yaml",
            environ={"AYS_DB_PASSWORD": "caf\udce9"},  # os.environ's form of the byte 0xe9
        )


def test_a_config_file_that_is_not_utf8_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "uat.yaml"
    path.write_bytes(b"env: uat\nstorage:\n  url: sqlite:///caf\xe9.db\n")
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert str(caught.value) == (
        f"{path}: line 3, column 21: byte 0xe9 is not UTF-8; save the file as UTF-8"
    )
