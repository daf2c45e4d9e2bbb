"""`installConfig`: run in-process (Typer's CliRunner) and as the installed entry point.

Every test that takes `run` runs twice, ids `in-process` and `subprocess`; the subprocess is
`.venv/bin/installConfig` itself, so the packaging (entry point, resource lookup) is tested
too. Everything is staged under tmp_path with --root, except the privilege check.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from ays_installer import render
from ays_installer.install_config import app
from ays_installer.render import MASK, mask, write_atomic, yaml_value
from ays_installer.resources import load_env, resource_root
from ays_runtime.config import EnvConfig, load_config_file

INSTALL_CONFIG = Path(sys.executable).parent / "installConfig"
DIRS = ("conf_dir", "log_dir", "data_dir")
# Awkward on purpose: quotes, YAML syntax and a URL-ish @ must survive rendering unharmed.
SECRETS = {
    "AYS_ACCESS_TOKEN": "tok-4f1c9e27-access",
    "AYS_CLUSTER_SECRET": "tok-4f1c9e27-access-cluster",
    "AYS_DB_PASSWORD": "pw-9a#b: \"c'd",
    "AYS_CONSUL_TOKEN": "consul-0d6e7a1b-acl",
    "AYS_ROCKETMQ_SECRET": "rmq-58c2}{x-secret",
}
ROTATED = {name: f"{value}-rotated2" for name, value in SECRETS.items()}
NO_SECRETS: dict[str, str | None] = {name: None for name in SECRETS}


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


Run = Callable[..., Outcome]


@pytest.fixture(params=["in-process", "subprocess"])
def run(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Run:
    """run(*args, env={NAME: value or None to unset}, euid=None) -> Outcome.

    `euid` runs as that non-root user id: in-process by faking os.geteuid, as a subprocess
    inside a user namespace (unshare) that maps the id onto the real user.
    """
    in_process = request.param == "in-process"

    def invoke(*args: str, env: Mapping[str, str | None] = NO_SECRETS, euid: int | None = None):
        if in_process:
            if euid is not None:
                monkeypatch.setattr(os, "geteuid", lambda: euid)
            result = CliRunner(env=dict(env)).invoke(app, list(args), prog_name="installConfig")
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            return Outcome(result.exit_code, result.stdout, result.stderr)
        environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        command = [str(INSTALL_CONFIG), *args]
        if euid is not None:
            if shutil.which("unshare") is None:
                pytest.skip("needs unshare(1) to run as another user id")
            command = ["unshare", "--user", f"--map-user={euid}", f"--map-group={euid}", *command]
        done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60)
        return Outcome(done.returncode, done.stdout, done.stderr)

    if not in_process:
        assert INSTALL_CONFIG.is_file(), f"{INSTALL_CONFIG} missing: pip install -e ."
    return invoke


@pytest.fixture
def stage(tmp_path: Path) -> Path:
    """The --root of a staged install (not created: installConfig creates it)."""
    return tmp_path / "stage"


@pytest.fixture
def resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An editable copy of templates/ and envs/, used through AYS_RESOURCES (from a working
    directory without envs/ of its own, which would come first)."""
    copy = tmp_path / "resources"
    for part in ("templates", "envs"):
        shutil.copytree(resource_root() / part, copy / part)
    monkeypatch.setenv("AYS_RESOURCES", str(copy))
    monkeypatch.chdir(tmp_path)
    yield copy


def staged(config: EnvConfig, root: Path, **role_changes: dict[str, object]) -> EnvConfig:
    """`config` as a --root install makes it: every dir under root, then role_changes."""
    sections = {}
    for role in ("manager", "node"):
        section = getattr(config, role)
        dirs = {name: f"{root}{getattr(section, name)}" for name in DIRS}
        sections[role] = section.model_copy(update=dirs | role_changes.get(role, {}))
    return config.model_copy(update=sections)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_refused(outcome: Outcome, *expected: str) -> None:
    assert outcome.code == 2, outcome
    assert outcome.out == ""
    for text in expected:
        assert text in outcome.err
    assert "Traceback" not in outcome.err


# -- what it writes ----------------------------------------------------------------------------


def test_dev_renders_a_manager_config_that_loads_back_into_the_same_settings(
    run: Run, stage: Path
) -> None:
    done = run("manager", "-e", "dev", "-p", "10.1.2.3", "-P", "18099", "--root", str(stage))

    path = stage / "etc/ays/manager.yaml"
    assert done.code == 0, done
    assert done.out.splitlines() == [
        f"created {stage}/etc/ays",
        f"created {stage}/var/log/ays",
        f"created {stage}/var/lib/ays",
        f"wrote {path}",
    ]
    expected = staged(load_env("dev"), stage, manager={"ip": "10.1.2.3", "port": 18099})
    assert load_config_file(path) == expected
    assert files_under(stage) == [path]


def test_a_staged_install_keeps_every_path_under_its_root(run: Run, stage: Path) -> None:
    run("manager", "-e", "dev", "--root", str(stage))

    config = load_config_file(stage / "etc/ays/manager.yaml")
    assert config.storage_url() == f"sqlite:///{stage}/var/lib/ays/ays.db"
    for role in ("manager", "node"):
        for name in DIRS:
            assert getattr(getattr(config, role), name).startswith(f"{stage}/")


def test_a_node_config_takes_its_address_and_group_from_the_command_line(stage: Path) -> None:
    done = CliRunner(env=NO_SECRETS).invoke(
        app, ["node", "-e", "dev", "-g", "node_group_ksa", "-p", "172.21.16.121", "-P", "18181",
              "--root", str(stage)],
    )  # fmt: skip

    assert done.exit_code == 0, done.output
    path = stage / "etc/ays/node.yaml"
    assert done.stdout.splitlines()[-1] == f"wrote {path}"
    node = {"ip": "172.21.16.121", "port": 18181, "group": "node_group_ksa"}
    assert load_config_file(path) == staged(load_env("dev"), stage, node=node)
    assert (stage / "var/lib/ays-node").is_dir()
    assert not (stage / "var/lib/ays").exists(), "a node does not need the manager's data dir"


def test_uat_renders_with_the_secrets_read_from_the_environment(run: Run, stage: Path) -> None:
    done = run("manager", "-e", "uat", "--root", str(stage), "--skip-preflight", env=SECRETS)

    assert done.code == 0, done
    text = (stage / "etc/ays/manager.yaml").read_text()
    settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in settings if "${" in line], "every placeholder is resolved"
    config = load_config_file(stage / "etc/ays/manager.yaml")
    assert config.access_token.get_secret_value() == SECRETS["AYS_ACCESS_TOKEN"]
    # Percent-encoded in the URL (the password holds '#', ':' and quotes), read back whole.
    url = make_url(config.storage_url())
    assert (url.password, url.host) == (SECRETS["AYS_DB_PASSWORD"], "mysql.uat.example.internal")
    assert config.registry.token.get_secret_value() == SECRETS["AYS_CONSUL_TOKEN"]  # type: ignore[union-attr]
    assert config.transport.secret_key.get_secret_value() == SECRETS["AYS_ROCKETMQ_SECRET"]  # type: ignore[union-attr]
    for value in SECRETS.values():
        assert value not in done.out + done.err


def test_the_rendered_file_loads_without_the_secrets_environment(
    stage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    CliRunner(env=SECRETS).invoke(
        app, ["node", "-e", "prod", "-g", "g1", "--root", str(stage), "--skip-preflight"]
    )
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)

    config = load_config_file(stage / "etc/ays/node.yaml")
    assert config.access_token.get_secret_value() == SECRETS["AYS_ACCESS_TOKEN"]


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_the_config_file_is_mode_0640_whatever_the_umask(stage: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        CliRunner(env=SECRETS).invoke(
            app, ["manager", "-e", "uat", "--root", str(stage), "--skip-preflight"]
        )
    finally:
        os.umask(old)

    assert stat.S_IMODE((stage / "etc/ays/manager.yaml").stat().st_mode) == 0o640


def test_running_twice_changes_nothing_and_says_so(run: Run, stage: Path) -> None:
    run("manager", "-e", "uat", "--root", str(stage), "--skip-preflight", env=SECRETS)
    path = stage / "etc/ays/manager.yaml"
    before = path.stat()

    again = run("manager", "-e", "uat", "--root", str(stage), "--skip-preflight", env=SECRETS)

    assert again.code == 0, again
    watch = stage / "etc/ays/consul-watch-ays.json"  # uat's registry is consul
    assert again.out == f"unchanged {path}\nunchanged {watch}\nnothing changed\n"
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_changed_input_rewrites_the_file_and_says_so(stage: Path) -> None:
    args = ["manager", "-e", "dev", "--root", str(stage)]
    CliRunner(env=NO_SECRETS).invoke(app, args)

    done = CliRunner(env=NO_SECRETS).invoke(app, [*args, "-P", "18090"])

    path = stage / "etc/ays/manager.yaml"
    assert done.stdout == f"wrote {path}\n"
    assert load_config_file(path).manager.port == 18090


def test_a_wrong_mode_is_repaired_on_the_next_run(stage: Path) -> None:
    args = ["manager", "-e", "dev", "--root", str(stage)]
    CliRunner(env=NO_SECRETS).invoke(app, args)
    path = stage / "etc/ays/manager.yaml"
    path.chmod(0o644)

    dry = CliRunner(env=NO_SECRETS).invoke(app, [*args, "--dry-run"])
    done = CliRunner(env=NO_SECRETS).invoke(app, args)

    assert dry.stdout == f"would set mode 0640 on {path} (now 0644)\n"
    assert done.stdout == f"wrote {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# -- --dry-run ---------------------------------------------------------------------------------


def test_a_dry_run_writes_nothing_and_masks_the_secrets(run: Run, stage: Path) -> None:
    done = run(
        "manager", "-e", "uat", "--root", str(stage), "--skip-preflight", "--dry-run", env=SECRETS
    )

    assert done.code == 0, done
    assert not stage.exists()
    assert f"would create {stage}/etc/ays\n" in done.out
    assert f"+++ {stage}/etc/ays/manager.yaml (rendered)\n" in done.out
    assert f"+access_token: {MASK}\n" in done.out
    assert f"+  token: {MASK}\n" in done.out
    assert f"+  secret_key: {MASK}\n" in done.out
    assert f'+  url: "mysql+pymysql://ays:{MASK}@mysql.uat.example.internal:3306/ays"\n' in done.out
    assert "+  port: 18080\n" in done.out
    for value in SECRETS.values():
        assert value not in done.out + done.err
        assert yaml_value(value)[1:-1] not in done.out, "nor its quoted form"


def test_a_dry_run_shows_the_change_but_neither_the_old_nor_the_new_secrets(
    stage: Path,
) -> None:
    CliRunner(env=SECRETS).invoke(
        app, ["manager", "-e", "uat", "--root", str(stage), "--skip-preflight"]
    )
    path = stage / "etc/ays/manager.yaml"
    before = path.read_bytes()

    done = CliRunner(env=ROTATED).invoke(
        app,
        [
            "manager",
            "-e",
            "uat",
            "--root",
            str(stage),
            "--skip-preflight",
            "-P",
            "18090",
            "--dry-run",
        ],
    )

    assert done.exit_code == 0, done.output
    assert "-  port: 18080\n+  port: 18090\n" in done.stdout
    assert f"-access_token: {MASK}\n+access_token: {MASK}\n" in done.stdout
    assert f"-  token: {MASK}\n+  token: {MASK}\n" in done.stdout
    for value in [*SECRETS.values(), *ROTATED.values()]:
        assert value not in done.stdout + done.stderr
    assert path.read_bytes() == before


def test_a_dry_run_with_nothing_to_change_says_so(stage: Path) -> None:
    args = ["node", "-e", "dev", "--root", str(stage)]
    CliRunner(env=NO_SECRETS).invoke(app, args)

    done = CliRunner(env=NO_SECRETS).invoke(app, [*args, "--dry-run"])

    assert done.stdout == f"unchanged {stage}/etc/ays/node.yaml\nnothing would change\n"


# -- bad input: exit 2, a message naming what is wrong, nothing written ------------------------


def test_a_missing_secret_variable_is_an_error_naming_it(run: Run, stage: Path) -> None:
    env = {**SECRETS, "AYS_DB_PASSWORD": None}

    done = run("manager", "-e", "uat", "--root", str(stage), env=env)

    assert_refused(done, "uat.yaml", "storage.url", "AYS_DB_PASSWORD is not set")
    for value in SECRETS.values():
        assert value not in done.err
    assert not stage.exists()


@pytest.mark.parametrize("token", ["tok\nen-4f1c9e27", "tök-4f1c9e27", "tok en-4f1c9e27"])
def test_a_token_that_cannot_be_an_http_header_value_is_refused_naming_the_variable(
    run: Run, stage: Path, token: str
) -> None:
    done = run(
        "node", "-e", "uat", "--root", str(stage), env={**SECRETS, "AYS_ACCESS_TOKEN": token}
    )

    assert_refused(done, "uat.yaml", "access_token (from $AYS_ACCESS_TOKEN)", "HTTP header")
    assert "4f1c9e27" not in done.err
    assert not stage.exists()


@pytest.mark.parametrize("password", ["Sec@Pass99", "p@ss:w/rd"])
def test_a_db_password_with_at_colon_and_slash_renders_and_loads_back(
    run: Run, stage: Path, password: str
) -> None:
    env = {**SECRETS, "AYS_DB_PASSWORD": password}
    done = run("manager", "-e", "uat", "--root", str(stage), "--skip-preflight", env=env)

    assert done.code == 0, done
    assert password not in done.out + done.err and "Traceback" not in done.err
    url = make_url(load_config_file(stage / "etc/ays/manager.yaml").storage_url())
    assert (url.password, url.host) == (password, "mysql.uat.example.internal")
    env = {**env, "AYS_DB_PASSWORD": password + "-rotated"}
    shown = run(
        "manager", "-e", "uat", "--root", str(stage), "--skip-preflight", "--dry-run", env=env
    )
    assert shown.code == 0 and "storage" not in shown.err, shown
    for secret in (password, password + "-rotated", "Pass99", "w%2Frd"):
        assert secret not in shown.out


def test_under_sudo_a_missing_secret_says_how_to_pass_it_through(stage: Path) -> None:
    env = {**NO_SECRETS, "SUDO_USER": "alice"}
    done = CliRunner(env=env).invoke(app, ["node", "-e", "uat", "--root", str(stage)])

    assert done.exit_code == 2
    assert "AYS_ACCESS_TOKEN is not set" in done.stderr
    assert "sudo --preserve-env=" in done.stderr


def test_a_bad_env_file_fails_naming_the_file_the_field_and_what_was_expected(
    run: Run, stage: Path, resources: Path
) -> None:
    bad = resources / "envs/bad.yaml"
    bad.write_text(
        "env: bad\nstorage: {url: 'sqlite:///{data_dir}/ays.db'}\n"
        "registry: {backend: builtin}\ntransport: {backend: builtin}\n"
        "manager:\n  port: high\n"
    )

    done = run("manager", "-e", "bad", "--root", str(stage))

    assert_refused(done, str(bad), "manager.port", "valid integer", "(got 'high')")
    assert not stage.exists()


def test_a_relative_directory_in_the_env_file_is_refused(stage: Path, resources: Path) -> None:
    env_file = resources / "envs/dev.yaml"
    env_file.write_text(env_file.read_text().replace("data_dir: /var/lib/ays\n", "data_dir: x\n"))

    done = CliRunner(env=NO_SECRETS).invoke(app, ["manager", "-e", "dev", "--root", str(stage)])

    assert done.exit_code == 2
    assert f"{env_file}: field manager.data_dir: 'x' is not an absolute path" in done.stderr


def test_an_unknown_environment_lists_the_known_ones(run: Run, stage: Path) -> None:
    done = run("node", "-e", "staging", "--root", str(stage))

    assert_refused(done, "unknown environment 'staging'", "known environments are")
    known = done.err.split("known environments are", 1)[1]
    for name in ("dev", "prod", "uat"):
        assert name in known


def test_a_missing_environment_option_lists_the_known_ones(run: Run, stage: Path) -> None:
    done = run("manager", "--root", str(stage))

    assert_refused(done, "-e ENV", "dev", "prod", "uat")


def test_a_bad_ip_is_refused_showing_the_value(run: Run, stage: Path) -> None:
    done = run("manager", "-e", "dev", "-p", "999.1.1.1", "--root", str(stage))

    assert_refused(done, "'999.1.1.1' is not an IP address", "-p")
    assert not stage.exists()


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_a_bad_port_is_refused_showing_the_value(run: Run, stage: Path, port: str) -> None:
    done = run("node", "-e", "dev", "-P", port, "--root", str(stage))

    assert_refused(done, f"'{port}' is not a port number (1-65535)", "-P")
    assert not stage.exists()


def test_an_empty_node_group_is_refused(stage: Path) -> None:
    done = CliRunner(env=NO_SECRETS).invoke(app, ["node", "-e", "dev", "-g", " ", "--root", "x"])

    assert done.exit_code == 2
    assert "is not a node group name" in done.stderr


def test_without_root_and_without_root_privileges_it_refuses(run: Run) -> None:
    done = run("manager", "-e", "dev", euid=1000)

    assert_refused(
        done,
        "installConfig: writing to /etc/ays needs root; run it with sudo, "
        "or stage it with --root DIR",
    )


def test_without_root_privileges_a_staged_install_works(stage: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    done = CliRunner(env=NO_SECRETS).invoke(app, ["manager", "-e", "dev", "--root", str(stage)])

    assert done.exit_code == 0, done.output


def test_a_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    done = CliRunner(env=NO_SECRETS).invoke(
        app, ["manager", "-e", "dev", "--root", str(tmp_path / "file")]
    )

    assert done.exit_code == 2
    assert "is a file" in done.stderr


def test_a_template_error_names_the_template_and_line_and_leaves_nothing_behind(
    run: Run, stage: Path, resources: Path
) -> None:
    template = resources / "templates/config/manager.yaml.j2"
    template.write_text(template.read_text() + "{{ no_such_value }}\n")

    done = run("manager", "-e", "dev", "--root", str(stage))

    assert_refused(done, f"{template}: line ", "'no_such_value' is undefined")
    assert not stage.exists()


def test_a_template_that_leaves_out_a_section_is_refused(stage: Path, resources: Path) -> None:
    template = resources / "templates/config/node.yaml.j2"
    template.write_text(template.read_text().replace('{{ section("job_log") }}', ""))

    done = CliRunner(env=NO_SECRETS).invoke(app, ["node", "-e", "dev", "--root", str(stage)])

    assert done.exit_code == 2
    assert f"{template}: does not write job_log" in done.stderr
    assert not stage.exists()


def test_a_secret_holding_a_placeholder_is_refused_without_showing_it(stage: Path) -> None:
    env = {**SECRETS, "AYS_CONSUL_TOKEN": "abc${HOME}def"}

    done = CliRunner(env=env).invoke(app, ["node", "-e", "uat", "-g", "g1", "--root", str(stage)])

    assert done.exit_code == 2
    assert "field registry.token" in done.stderr
    assert "abc" not in done.stderr
    assert not stage.exists()


def test_a_failing_write_is_reported_with_exit_1_and_the_path(
    stage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(render.os, "replace", refuse)

    done = CliRunner(env=NO_SECRETS).invoke(app, ["manager", "-e", "dev", "--root", str(stage)])

    assert done.exit_code == 1
    assert f"error: {stage}/etc/ays/manager.yaml: cannot write: Permission denied" in done.stderr
    assert files_under(stage) == [], "no temp file is left behind"


# -- the pieces --------------------------------------------------------------------------------


def test_write_atomic_says_whether_it_changed_anything(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"

    assert write_atomic(path, "a: 1\n", 0o640) is True
    assert write_atomic(path, "a: 1\n", 0o640) is False
    assert write_atomic(path, "a: 2\n", 0o640) is True
    assert write_atomic(path, "a: 2\n", 0o600) is True
    assert path.read_text() == "a: 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.yaml"]


def test_write_atomic_sets_the_group_that_must_read_the_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's group to any group needs root")
    path = tmp_path / "f.yaml"

    assert write_atomic(path, "a: 1\n", 0o640, gid=65534) is True
    assert path.stat().st_gid == 65534
    assert write_atomic(path, "a: 1\n", 0o640, gid=65534) is False


def test_write_atomic_keeps_the_old_file_and_no_temp_file_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.yaml"
    write_atomic(path, "old\n", 0o640)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new\n" * 100_000, 0o640)

    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.yaml"]


@pytest.mark.parametrize(
    "value",
    ["plain", "", "null", "yes", "123", 'q"uo\\te', "a: b # c", "line\nbreak", "\u2028é😀",
     "${NOT_EXPANDED}", 0, 2.5, True, None, ["a:b", "c"]],
)  # fmt: skip
def test_yaml_value_writes_one_line_that_loads_back_to_the_value(value: object) -> None:
    import yaml

    text = yaml_value(value)

    assert "\n" not in text
    assert yaml.safe_load(f"k: {text}\n") == {"k": value}


def test_mask_hides_secret_settings_url_passwords_and_given_values() -> None:
    text = (
        '+access_token: "a-token"\n'
        "-  token: b-token\n"
        "   token: null\n"
        '   url: "mysql+pymysql://ays:pa:ss@db:3306/ays"\n'
        '+  host: "given-secret.example"\n'
    )

    assert mask(text, ["given-secret"]) == (
        f"+access_token: {MASK}\n"
        f"-  token: {MASK}\n"
        "   token: null\n"
        f'   url: "mysql+pymysql://ays:{MASK}@db:3306/ays"\n'
        f'+  host: "{MASK}.example"\n'
    )


def test_a_node_config_points_at_the_manager_given_with_dash_m(stage: Path) -> None:
    done = CliRunner(env=NO_SECRETS).invoke(
        app, ["node", "-e", "dev", "-g", "g1", "-m", "172.21.16.81:28080", "--root", str(stage)]
    )

    assert done.exit_code == 0, done.output
    config = load_config_file(stage / "etc/ays/node.yaml")
    assert (config.manager.ip, config.manager.port) == ("172.21.16.81", 28080)


def test_a_node_config_names_every_manager_given_with_dash_m(stage: Path) -> None:
    managers = ["172.21.16.81:28080", "172.21.16.82:28080", "[fd00::1]:28080"]
    args = [arg for address in managers for arg in ("-m", address)]
    done = CliRunner(env=NO_SECRETS).invoke(
        app, ["node", "-e", "dev", "-g", "g1", *args, "--root", str(stage)]
    )

    assert done.exit_code == 0, done.output
    config = load_config_file(stage / "etc/ays/node.yaml")
    assert (config.manager.ip, config.manager.port) == ("172.21.16.81", 28080)
    assert config.node.managers == managers
    assert "managers: [" in (stage / "etc/ays/node.yaml").read_text()


@pytest.mark.parametrize("address", ["172.21.16.81", "1.2.3:80", "10.0.0.1:99999"])
def test_a_bad_manager_address_is_refused_showing_the_value(
    run: Run, stage: Path, address: str
) -> None:
    done = run("node", "-e", "dev", "-m", address, "--root", str(stage))

    assert done.code == 2 and "-m" in done.err
    assert not stage.exists()


def test_every_missing_secret_is_named_in_one_run(run: Run, stage: Path) -> None:
    done = run("manager", "-e", "uat", "--root", str(stage))

    assert_refused(
        done,
        "field access_token: environment variable AYS_ACCESS_TOKEN is not set",
        "field storage.url: environment variable AYS_DB_PASSWORD is not set",
        "field registry.token: environment variable AYS_CONSUL_TOKEN is not set",
        "field transport.secret_key: environment variable AYS_ROCKETMQ_SECRET is not set",
        "field cluster_secret: environment variable AYS_CLUSTER_SECRET is not set",
        "export AYS_ACCESS_TOKEN=... AYS_CLUSTER_SECRET=... AYS_DB_PASSWORD=... "
        "AYS_CONSUL_TOKEN=... "
        "AYS_ROCKETMQ_SECRET=... before running this command",
    )
    assert not stage.exists()


def test_a_node_without_a_group_is_refused_with_the_full_command_which_then_works(
    run: Run, stage: Path
) -> None:
    given = ["-e", "uat", "-p", "10.0.0.5", "--root", str(stage), "--skip-preflight"]

    done = run("node", *given, env=SECRETS)

    assert_refused(done, "sets no node.group", "GROUP: e.g. node_group_ksa")
    command = done.err.split("run: ", 1)[1].split(" (GROUP:", 1)[0]
    assert command == (
        f"installConfig node -e uat -g GROUP -p 10.0.0.5 -P 18181 --root {stage} --skip-preflight"
    )
    assert not stage.exists()
    suggested = command.replace("GROUP", "node_group_ksa").split()[1:]
    again = run(*suggested, env=SECRETS)
    assert again.code == 0, again
    node = load_config_file(stage / "etc/ays/node.yaml").node
    assert (node.group, node.ip, node.port) == ("node_group_ksa", "10.0.0.5", 18181)
