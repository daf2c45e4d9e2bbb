"""Console sign-in with OpenID Connect (ays_runtime/console/oidc.py) against a real local
provider: a small OIDC provider on loopback, written here (discovery, an authorize endpoint
that approves the configured test user at once, a token endpoint checking the client secret
and PKCE, a JWKS; ID tokens signed RS256 with joserfc, Authlib's JOSE library), and a real
manager process. The flow is driven with httpx, following the redirects a browser follows.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from ays_runtime.config import parse_config
from ays_runtime.exceptions import ConfigError
from tests.daemons import TOKEN, client, free_port, manager, write_config

pytestmark = pytest.mark.slow

CLIENT_ID = "ays-console"
CLIENT_SECRET = "oidc-client-s3cret-never-logged"


@dataclass
class Provider:
    """The test's OIDC provider; `claims` is the user it signs in, `signing_key` what signs."""

    port: int
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1"}))
    claims: dict[str, Any] = field(default_factory=dict)
    signing_key: RSAKey | None = None
    redirect_uri: str = ""
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def id_token(self, nonce: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            **self.claims,
        }
        key = self.signing_key or self.key
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)


def _handler(provider: Provider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/.well-known/openid-configuration":
                base = provider.issuer
                self._json(
                    200,
                    {
                        "issuer": base,
                        "authorization_endpoint": f"{base}/authorize",
                        "token_endpoint": f"{base}/token",
                        "jwks_uri": f"{base}/jwks",
                        "response_types_supported": ["code"],
                        "id_token_signing_alg_values_supported": ["RS256"],
                        "code_challenge_methods_supported": ["S256"],
                    },
                )
            elif url.path == "/jwks":
                self._json(200, dict(KeySet([provider.key]).as_dict(private=False)))
            elif url.path == "/authorize":
                ok = (
                    query.get("client_id") == CLIENT_ID
                    and query.get("redirect_uri") == provider.redirect_uri
                    and query.get("response_type") == "code"
                    and query.get("code_challenge_method") == "S256"
                    and "openid" in query.get("scope", "").split()
                )
                if not ok:
                    self._json(400, {"error": "invalid_request", "query": query})
                    return
                code = secrets.token_urlsafe(16)
                provider.codes[code] = query
                target = f"{query['redirect_uri']}?" + urlencode(
                    {"code": code, "state": query["state"]}
                )
                self.send_response(302)
                self.send_header("location", target)
                self.send_header("content-length", "0")
                self.end_headers()
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length", "0"))
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            basic = httpx.BasicAuth(CLIENT_ID, CLIENT_SECRET)
            expected = next(basic.auth_flow(httpx.Request("POST", "http://x"))).headers
            if self.headers.get("authorization") != expected["authorization"]:
                self._json(401, {"error": "invalid_client"})
                return
            grant = provider.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            if (
                grant is None
                or form.get("redirect_uri") != grant["redirect_uri"]
                or create_s256_code_challenge(verifier) != grant["code_challenge"]
            ):
                self._json(400, {"error": "invalid_grant"})
                return
            self._json(
                200,
                {
                    "access_token": secrets.token_urlsafe(16),
                    "token_type": "Bearer",
                    "expires_in": 300,
                    "id_token": provider.id_token(grant["nonce"]),
                },
            )

    return Handler


MAPPING = [
    {"value": "ays-ops", "role": "operator", "groups": ["g1"]},
    {"value": "ays-admins", "role": "admin"},
]


@dataclass
class Setup:
    provider: Provider
    manager_port: int
    tmp: Path
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.manager_port}"

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=20, follow_redirects=True)

    def user_row(self, name: str) -> tuple[Any, ...] | None:
        with sqlite3.connect(self.tmp / "ays.db") as db:
            row: tuple[Any, ...] | None = db.execute(
                "SELECT role, groups, source, password_hash FROM ays_user WHERE name = ?", (name,)
            ).fetchone()
            return row


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from ays_runtime.storage.migrate import upgrade

    tmp = tmp_path_factory.mktemp("oidc")
    provider = Provider(free_port())
    server = ThreadingHTTPServer(("127.0.0.1", provider.port), _handler(provider))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    manager_port = free_port()
    base = f"http://127.0.0.1:{manager_port}"
    provider.redirect_uri = f"{base}/login/oidc/callback"
    url = f"sqlite:///{tmp / 'ays.db'}"
    upgrade(url)
    oidc = {
        "name": "TestIdP",
        "issuer": provider.issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "roles_claim": "groups",
        "mapping": MAPPING,
        "redirect_base": base,
    }
    config = write_config(tmp / "ays.yaml", url, manager_port, tmp, console={"oidc": oidc})
    daemon = manager(config, tmp / "m.log", manager_port)
    try:
        daemon.start()
        yield Setup(provider, manager_port, tmp, tmp / "m.log")
    finally:
        daemon.kill()
        server.shutdown()
        server.server_close()
        thread.join(10)


def _sign_in(setup: Setup, browser: httpx.Client, next: str = "/runs") -> httpx.Response:
    return browser.get("/login/oidc", params={"next": next})


def test_an_operator_of_g1_by_claim_signs_in_and_gets_an_operator_session_of_g1(
    setup: Setup,
) -> None:
    setup.provider.signing_key = None
    setup.provider.claims = {"sub": "u-1", "preferred_username": "olga", "groups": ["ays-ops"]}
    with setup.browser() as browser:
        login = browser.get("/login")
        assert "Sign in with TestIdP" in login.text
        landed = _sign_in(setup, browser)
        assert landed.status_code == 200, landed.text
        assert "Signed in as olga" in landed.text
        runs = browser.get("/runs")
        assert runs.status_code == 200 and "olga (operator)" in runs.text
    role, groups, source, password_hash = setup.user_row("olga") or ()
    assert (role, json.loads(groups), source, password_hash) == ("operator", ["g1"], "oidc", "")
    # The claim is read on every sign-in: now an admin, and the change is audited.
    setup.provider.claims = {**setup.provider.claims, "groups": ["ays-admins", "other"]}
    with setup.browser() as browser:
        assert _sign_in(setup, browser).status_code == 200
    assert (setup.user_row("olga") or ())[:2] == ("admin", "[]")
    with client(setup.manager_port, TOKEN) as api:
        entries = api.get("/audit", params={"target": "olga"}).json()["items"]
    assert [e["action"] for e in entries] == ["user.updated", "user.created"]
    assert entries[0]["who"] == "oidc" and entries[0]["after"]["role"] == "admin"


def test_a_claim_that_maps_to_nothing_is_refused_with_a_clear_page(setup: Setup) -> None:
    setup.provider.signing_key = None
    setup.provider.claims = {"sub": "u-2", "preferred_username": "nina", "groups": ["sales"]}
    with setup.browser() as browser:
        refused = _sign_in(setup, browser)
        assert refused.status_code == 403
        assert "no value of the &#39;groups&#39; claim maps to a role" in refused.text
        assert browser.get("/runs").url.path == "/login"  # no session
    assert setup.user_row("nina") is None


def test_a_tampered_state_is_refused(setup: Setup) -> None:
    setup.provider.signing_key = None
    setup.provider.claims = {"sub": "u-3", "preferred_username": "tess", "groups": ["ays-ops"]}
    with httpx.Client(base_url=setup.base, timeout=20) as browser:
        to_provider = browser.get("/login/oidc")
        assert to_provider.status_code == 303
        back = httpx.get(to_provider.headers["location"], timeout=20)
        assert back.status_code == 302
        callback = urlsplit(back.headers["location"])
        query = {k: v[0] for k, v in parse_qs(callback.query).items()}
        query["state"] = query["state"][::-1]
        refused = browser.get(callback.path, params=query)
        assert refused.status_code == 400
        assert "state does not match" in refused.text
        # Without the flow's cookie (another browser) the callback is refused too.
        with httpx.Client(base_url=setup.base, timeout=20) as other:
            assert other.get(callback.path, params=query).status_code == 400
    assert setup.user_row("tess") is None


def test_an_id_token_signed_by_another_key_is_refused(setup: Setup) -> None:
    setup.provider.claims = {"sub": "u-4", "preferred_username": "mal", "groups": ["ays-admins"]}
    setup.provider.signing_key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    try:
        with setup.browser() as browser:
            refused = _sign_in(setup, browser)
            assert refused.status_code == 401
            assert "did not verify" in refused.text
    finally:
        setup.provider.signing_key = None
    assert setup.user_row("mal") is None


def test_no_secret_in_the_managers_log(setup: Setup) -> None:
    setup.provider.claims = {"sub": "u-5", "preferred_username": "sam", "groups": ["ays-ops"]}
    with setup.browser() as browser:
        assert _sign_in(setup, browser).status_code == 200
    log = setup.log.read_text(errors="replace")
    assert CLIENT_SECRET not in log


def _config(**oidc: Any) -> dict[str, Any]:
    base = {
        "issuer": "https://sso.example.com",
        "client_id": "ays",
        "client_secret": "s3cret-value",
        "mapping": MAPPING,
        "redirect_base": "https://ays.example.com",
    }
    return {
        "env": "dev",
        "storage": {"url": "sqlite:///x.db"},
        "registry": {"backend": "builtin"},
        "transport": {"backend": "builtin"},
        "console": {"oidc": {**base, **oidc}},
    }


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"issuer": "sso.example.com"}, "console.oidc.issuer"),
        ({"redirect_base": "ftp://x"}, "console.oidc.redirect_base"),
        ({"scopes": ["profile"]}, "console.oidc.scopes"),
        ({"mapping": []}, "console.oidc.mapping"),
        ({"mapping": [{"value": "x", "role": "operator"}]}, "console.oidc.mapping.0"),
        ({"mapping": [{"value": "x", "role": "boss"}]}, "console.oidc.mapping.0.role"),
        ({"default_role": "admin"}, "console.oidc.default_role"),
        ({"client_secret": ""}, "console.oidc.client_secret"),
    ],
)
def test_bad_oidc_config_is_an_error_naming_the_field(
    change: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(**change), "ays.yaml")
    assert field_name in str(caught.value)
    assert "s3cret-value" not in str(caught.value)


def test_a_missing_section_does_not_echo_the_whole_config_and_its_secrets() -> None:
    data = _config()
    del data["transport"]
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "ays.yaml")
    assert "transport" in str(caught.value)
    assert "s3cret-value" not in str(caught.value)


def test_a_good_oidc_config_keeps_the_secret_secret() -> None:
    config = parse_config(_config(), "ays.yaml")
    oidc = config.console.oidc
    assert oidc is not None and oidc.default_role == "refuse" and oidc.scopes[0] == "openid"
    assert "s3cret-value" not in repr(config)


def test_in_chromium_the_button_signs_in_through_the_provider(setup: Setup) -> None:
    """A real browser: the SameSite cookies survive the round trip through the provider."""
    from playwright.sync_api import sync_playwright

    chromium_path = Path("/usr/bin/chromium")
    assert chromium_path.exists(), "no /usr/bin/chromium: run scripts/test (it installs it)"
    setup.provider.signing_key = None
    setup.provider.claims = {"sub": "u-6", "preferred_username": "cleo", "groups": ["ays-ops"]}
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(chromium_path), chromium_sandbox=False, args=["--no-sandbox"]
        )
        try:
            page = chromium.new_page()
            page.goto(f"{setup.base}/runs")
            assert "/login" in page.url
            page.click("#oidc-sign-in")
            page.wait_for_url(f"{setup.base}/runs", timeout=30_000)
            page.wait_for_selector("#signed-in", timeout=30_000)
            assert page.inner_text("#signed-in") == "cleo (operator)"
        finally:
            chromium.close()


def test_install_config_renders_console_oidc_with_its_secret_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from typer.testing import CliRunner

    from ays_installer.install_config import app
    from ays_installer.resources import resource_root
    from ays_runtime.config import load_config_file

    resources = tmp_path / "resources"
    for part in ("templates", "envs"):
        shutil.copytree(resource_root() / part, resources / part)
    oidc = {**_config()["console"]["oidc"], "client_secret": "${AYS_OIDC_CLIENT_SECRET}"}
    with (resources / "envs/dev.yaml").open("a", encoding="utf-8") as env:
        env.write("\nconsole:\n  oidc: " + json.dumps(oidc) + "\n")  # JSON is YAML
    monkeypatch.setenv("AYS_RESOURCES", str(resources))
    monkeypatch.chdir(tmp_path)  # the checkout's own envs/ would come first
    stage = tmp_path / "stage"
    secrets_env = {"AYS_OIDC_CLIENT_SECRET": "first-oidc-s3cret"}
    done = CliRunner(env=secrets_env).invoke(app, ["manager", "-e", "dev", "--root", str(stage)])
    assert done.exit_code == 0, done.output
    assert "first-oidc-s3cret" not in done.output
    config = load_config_file(stage / "etc/ays/manager.yaml")
    assert config.console.oidc is not None
    assert config.console.oidc.client_secret.get_secret_value() == "first-oidc-s3cret"
    assert config.console.oidc.mapping[0].groups == ["g1"]
    # A dry run with another secret shows the change masked: neither the old nor the new one.
    secrets_env = {"AYS_OIDC_CLIENT_SECRET": "second-oidc-s3cret"}
    dry = CliRunner(env=secrets_env).invoke(
        app, ["manager", "-e", "dev", "--root", str(stage), "--dry-run"]
    )
    assert dry.exit_code == 0, dry.output
    assert "oidc" in dry.output
    assert "first-oidc-s3cret" not in dry.output and "second-oidc-s3cret" not in dry.output
