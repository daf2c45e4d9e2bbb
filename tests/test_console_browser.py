"""The web console in a real browser: Debian's Chromium driven by Playwright, against a real
manager and node on loopback (tests/daemons.py).

One walk through what an operator does: sign in, create a task through the form (a bad cron
first, its error shown beside the field), watch it fire on the dashboard, open the running
job's live output and see lines appear, kill it, disable the task, sign out and be refused.
Every request the pages make is recorded: all of them go to the manager on loopback (the
console works with the network cut). A screenshot of each page is taken into the test's own
temporary directory; with AYS_UPDATE_SCREENSHOTS=1 they replace docs/screenshots/, which the
README shows (a plain run leaves the checkout clean).

Playwright drives /usr/bin/chromium (`executable_path`); it never downloads a browser.
scripts/test installs chromium when it is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.daemons import TOKEN, Cluster, cluster

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# A job that writes a line a second for a minute: long enough to watch, then to kill.
SLOW_JOB = "for i in $(seq 1 60); do echo line $i; sleep 1; done"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "no /usr/bin/chromium: run scripts/test (it installs it)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), chromium_sandbox=False, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def ays(tmp_path: Path) -> Iterator[Cluster]:
    with cluster(tmp_path, Cluster) as running:
        yield running


class Recorder:
    """Every URL the page requested."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))

    def external(self) -> list[str]:
        return [
            url
            for url in self.urls
            if urlsplit(url).scheme not in ("data", "blob", "about")
            and urlsplit(url).hostname != "127.0.0.1"
        ]


def test_an_operator_creates_watches_kills_and_disables_a_task_then_signs_out(
    browser: Browser, ays: Cluster, shot: Callable[[Page, str], None]
) -> None:
    base = f"http://127.0.0.1:{ays.manager_port}"
    context = browser.new_context(viewport=WIDE, base_url=base)
    context.set_default_timeout(30_000)
    page = context.new_page()
    requests = Recorder(page)
    console_lines: list[str] = []
    page.on("console", lambda message: console_lines.append(f"{message.type}: {message.text}"))

    # Signed out, a page sends the browser to the sign-in page; a wrong token is refused.
    page.goto("/tasks")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Ftasks$"))
    shot(page, "login")
    page.get_by_label("Access token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#token-error")).to_contain_text("not this environment")
    # With the keyboard alone: the token typed, Enter; then Tab reaches the skip link first.
    page.get_by_label("Access token").fill(TOKEN)
    page.get_by_label("Access token").press("Enter")
    expect(page).to_have_url(f"{base}/tasks")
    page.keyboard.press("Tab")
    expect(page.locator(":focus")).to_have_text("Skip to content")
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()

    # The form: a bad cron is shown by the helper as it is typed, and beside its field when
    # the form is sent; then a good one lists the next 10 fires.
    page.get_by_role("link", name="New task").click()
    page.get_by_label("Name", exact=True).fill("console-demo")
    page.get_by_label("Node group").select_option("g1")
    page.get_by_label("Schedule", exact=True).fill("*/61 * * * * *")
    expect(page.locator("#cron-preview .error")).to_contain_text("*/61")
    page.get_by_label("Command (shell)").fill(SLOW_JOB)
    page.get_by_label("Block").select_option("discard_new")
    page.get_by_role("button", name="Create task").click()
    expect(page.locator("#schedule-error")).to_contain_text("*/61")
    expect(page.get_by_label("Schedule", exact=True)).to_have_attribute("aria-invalid", "true")
    shot(page, "task-form-error")
    page.get_by_label("Schedule", exact=True).fill("*/5 * * * * *")
    expect(page.locator("#cron-preview ol.fires li")).to_have_count(10)
    shot(page, "task-form")
    page.get_by_role("button", name="Create task").click()
    expect(page.get_by_role("heading", name="Task console-demo")).to_be_visible()

    # It fires: the dashboard lists the run going; its page follows the output live.
    page.goto("/")
    going = page.locator("#going a[href^='/runs/']").first
    for _ in range(60):
        if going.count():
            break
        page.wait_for_timeout(1000)
        page.reload()
    expect(going).to_be_visible()
    expect(page.locator("#going")).to_contain_text("console-demo")
    shot(page, "dashboard")
    going.click()
    output = page.locator("#output")
    expect(output).to_contain_text("line 2", timeout=60_000)
    first = output.inner_text()
    expect(output).to_contain_text(f"line {first.count('line') + 2}", timeout=60_000)
    shot(page, "run-live-output")

    # Kill it: the run ends killed, its output stays readable.
    page.locator("#kill").click()
    try:
        expect(page.locator("#run-status")).to_have_text("killed", timeout=90_000)
    except AssertionError:
        print("\n".join(console_lines), "\n".join(requests.urls[-30:]), page.url, sep="\n")
        raise
    expect(output).to_contain_text("line 1")
    shot(page, "run-killed")

    # Disable the task.
    page.get_by_role("link", name="console-demo").first.click()
    page.get_by_role("button", name="Disable").click()
    expect(page.locator("#task-state")).to_have_text("disabled")
    shot(page, "task")

    # A node added by hand, then removed, through the API's own routes.
    page.goto("/nodes")
    page.get_by_label("IP", exact=True).fill("127.0.0.2")
    page.get_by_label("Port", exact=True).fill("18999")
    page.get_by_label("Group", exact=True).fill("g2")
    page.get_by_role("button", name="Add node").click()
    expect(page.locator(".notice")).to_contain_text("added 127.0.0.2:18999")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Remove node 127.0.0.2:18999").click()
    expect(page.locator(".notice")).to_contain_text("removed")
    expect(page.get_by_role("button", name="Remove node 127.0.0.2:18999")).to_have_count(0)

    # Tasks for the forecast to show: a pile-up of 120 at :00:00 of every hour, and more.
    shapes = [("hourly", "0 0 * * * *", 120), ("five-min", "0 */5 * * * *", 30)]
    shapes.append(("two-hours", "30 15 */2 * * *", 50))
    document = {
        "node_groups": [{"name": "g2"}],
        "tasks": [
            {
                "name": f"{name}-{i}",
                "node_group": "g2",
                "schedule": cron,
                "payload": {"command": "true"},
            }
            for name, cron, count in shapes
            for i in range(count)
        ],
    }
    with ays.api() as api:
        assert api.post("/apply", json=document).status_code == 200

    # The other pages, for the README; each loads without an error.
    for path, name in [
        ("/tasks", "tasks"),
        ("/runs", "runs"),
        ("/nodes", "nodes"),
        ("/forecast", "forecast"),
        ("/slots?task_id=1", "slots"),
        ("/docs", "api-docs"),
    ]:
        answer = page.goto(path)
        assert answer is not None and answer.status == 200, path
        page.wait_for_load_state("networkidle")
        shot(page, name)
        if name == "forecast":  # the pile-up's cells sit in the :00 column; one lists its tasks
            pileup = page.locator(".heatmap .cell.l5").first
            assert pileup.get_attribute("data-at", timeout=5000).endswith(":00")  # type: ignore[union-attr]
            pileup.click()
            expect(page.locator("#cell")).to_contain_text("150 task(s) due at")
            expect(page.locator("#cell")).to_contain_text("hourly-0")
    dark = browser.new_context(
        viewport=WIDE, base_url=base, color_scheme="dark", storage_state=context.storage_state()
    )
    night = dark.new_page()
    night_requests = Recorder(night)
    night.goto("/tasks")
    expect(night.get_by_role("heading", name="Tasks")).to_be_visible()
    background = night.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 20, 24)", background  # the dark palette of console.css
    shot(night, "tasks-dark")
    assert night_requests.urls and not night_requests.external(), night_requests.external()
    dark.close()
    phone = context.new_page()
    phone.set_viewport_size(PHONE)
    phone_requests = Recorder(phone)
    phone.goto("/")
    expect(phone.get_by_role("heading", name="Dashboard")).to_be_visible()
    shot(phone, "dashboard-phone")
    phone.close()

    # Sign out: the pages refuse the browser again.
    page.goto("/tasks")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{base}/login")
    page.goto("/runs")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fruns$"))
    assert all(cookie["name"] != "ays_session" for cookie in page.context.cookies())

    assert requests.urls and not requests.external(), requests.external()
    assert not phone_requests.external(), phone_requests.external()
    context.close()


def test_an_operator_creates_an_alert_policy_in_the_console_fixing_a_field_first(
    browser: Browser, ays: Cluster, shot: Callable[[Page, str], None]
) -> None:
    base = f"http://127.0.0.1:{ays.manager_port}"
    context = browser.new_context(viewport=WIDE, base_url=base)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto("/alerts")
    page.get_by_label("Access token").fill(TOKEN)
    page.get_by_label("Access token").press("Enter")
    expect(page).to_have_url(f"{base}/alerts")
    page.get_by_role("link", name="New channel").click()
    page.get_by_label("Name", exact=True).fill("ops-hook")
    page.get_by_label("URL", exact=True).fill("hooks.example/ays")
    page.get_by_label("Signing secret").fill("typed-in-the-browser")
    page.get_by_role("button", name="Create channel").click()
    expect(page.locator("#url-error")).to_contain_text("http")
    expect(page.get_by_label("URL", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Signing secret")).to_have_value("")  # never sent back
    page.get_by_label("URL", exact=True).fill("http://127.0.0.1:9/ays")
    page.get_by_label("Signing secret").fill("typed-in-the-browser")
    page.get_by_role("button", name="Create channel").click()
    expect(page.get_by_role("status").first).to_contain_text("created channel ops-hook")
    page.get_by_role("link", name="New rule").click()
    page.get_by_label("Name", exact=True).fill("too-slow")
    page.get_by_label("When", exact=True).select_option("running_longer_than")
    page.get_by_label("Seconds", exact=True).fill("600")
    page.get_by_label("Factor", exact=True).fill("3")
    page.get_by_role("button", name="Create rule").click()
    expect(page.locator("#channels-error")).to_contain_text("channels")
    page.get_by_label("ops-hook").check()
    page.get_by_role("button", name="Create rule").click()
    row = page.locator('tr[data-rule="too-slow"]')
    expect(row).to_contain_text("running_longer_than 600 s or 3 × p95")
    expect(row).to_contain_text("ops-hook")
    page.get_by_role("button", name="Silence rule too-slow").click()
    expect(row).to_contain_text("silenced")
    page.get_by_role("button", name="Send a test notice through ops-hook").click()
    expect(page.locator("#tested-ops-hook")).to_contain_text("queued")
    shot(page, "alerts")
    context.close()


def test_users_sign_in_with_a_password_and_a_viewer_sees_no_write_action(
    browser: Browser, tmp_path: Path
) -> None:
    with cluster(tmp_path, Cluster, with_node=False) as ays:
        base = f"http://127.0.0.1:{ays.manager_port}"
        admin_password = (tmp_path / "manager" / "admin_password").read_text().strip()
        context = browser.new_context(viewport=WIDE, base_url=base)
        context.set_default_timeout(30_000)
        page = context.new_page()

        # The dev env's first admin, with the password from its 0600 file.
        page.goto("/tasks")
        page.get_by_label("User").fill("admin")
        page.get_by_label("Password").fill("not the password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#token-error")).to_contain_text("do not match")
        page.get_by_label("Password").fill(admin_password)
        page.get_by_label("Password").press("Enter")
        expect(page).to_have_url(f"{base}/tasks")
        expect(page.locator("#signed-in")).to_have_text("admin (admin)")
        expect(page.get_by_role("link", name="New task")).to_be_visible()
        page.get_by_role("button", name="Sign out").click()

        with ays.api() as api:
            made = api.post(
                "/users", json={"name": "vera", "role": "viewer", "password": "a viewer's password"}
            )
            assert made.status_code == 201, made.text
        page.get_by_label("User").fill("vera")
        page.get_by_label("Password").fill("a viewer's password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#signed-in")).to_have_text("vera (viewer)")
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        page.goto("/tasks")
        expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
        expect(page.get_by_role("link", name="New task")).to_have_count(0)
        # Typed by hand, the form's address is refused all the same.
        answer = page.request.post(f"{base}/tasks/new", form={"name": "x"})
        assert answer.status == 403
        context.close()
