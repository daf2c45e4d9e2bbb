"""`aysManager task|run ...`, `reconcile`, `node`, `logs` as an operator runs them: the installed
entry points as subprocesses, against a real manager and node on 127.0.0.1 (one of each for
the whole module, SQLite). Each test names its own tasks, so they share the daemons.

Jobs that must still be running while a test looks wait for a release file the test creates,
so "seen while it ran" never depends on timing.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import TOKEN, Cluster, client, cluster, free_port, wait_for

AYS_MANAGER = str(Path(sys.executable).parent / "aysManager")
FINAL = {"succeeded", "failed", "timed_out", "killed", "node_lost", "skipped", "discarded"}


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI call: this one, without what would pick another manager."""
    env = {k: v for k, v in os.environ.items() if k not in ("AYS_TOKEN", "AYS_URL", "COLUMNS")}
    return {**env, **extra}


def cli(*args: str, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AYS_MANAGER, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(**extra),
    )


class Ays(Cluster):
    """The module's manager and node, with the CLI to call."""

    def run(
        self, *args: str, stdin: str | None = None, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--config", str(self.config), stdin=stdin, **extra)

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def task(self, command: str, *options: str) -> str:
        """A new task (yearly: fired by hand) running `command`; its name."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        self.ok("task", "add", name, "-g", "g1", "-s", "0 0 0 1 1 *", "-c", command, *options)
        return name

    def gated(self, before: str, after: str, code: int = 0) -> tuple[str, Path]:
        """A command printing `before`, waiting (at most a minute) for a release file, then
        printing `after` and exiting `code`; and that file."""
        release = self.tmp / f"release-{uuid.uuid4().hex[:8]}"
        command = (
            f"echo {before}; for i in $(seq 600); do [ -e {release} ] && break; sleep 0.1; "
            f"done; echo {after}; exit {code}"
        )
        return command, release

    def output(self, run_id: int) -> str:
        with client(self.manager_port) as api:
            return str(api.get(f"/job-logs/{run_id}/output").json()["text"])

    def run_state(self, run_id: int) -> dict[str, Any]:
        with client(self.manager_port) as api:
            return dict(api.get(f"/job-logs/{run_id}").json())


@pytest.fixture(scope="module")
def ays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ays]:
    with cluster(tmp_path_factory.mktemp("cli"), Ays) as running:
        yield running


class Lines:
    """A subprocess's stdout, line by line as it comes (a reader thread)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()

    def _read(self, stdout: Any) -> None:
        for line in stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def until(self, wanted: str, timeout: float = 60) -> None:
        while wanted not in self.seen:
            try:
                line = self.queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line {wanted!r} after {timeout}s; saw {self.seen}"
                ) from None
            assert line is not None, f"the output ended without {wanted!r}: {self.seen}"
            self.seen.append(line)


# --- tasks --------------------------------------------------------------------------------------


def test_a_task_is_added_listed_shown_edited_disabled_enabled_and_deleted(ays: Ays) -> None:
    name = ays.task("echo hello", "--timeout", "30", "--job-env", "MODE=full")
    listed = ays.json("task", "list", "--name", name)
    assert [(t["name"], t["timeout_s"], t["payload"]["env"]) for t in listed] == [
        (name, 30, {"MODE": "full"})
    ]
    table = ays.ok("task", "list")
    header, *rows = table.splitlines()
    assert header.split() == [
        "ID",
        "NAME",
        "GROUP",
        "SCHEDULE",
        "TYPE",
        "ENABLED",
        "VERSION",
        "TAGS",
        "RUNS",
    ]
    assert any(name in row and "echo hello" in row for row in rows)

    shown = ays.ok("task", "show", name)
    assert f"name:        {name}" in shown and "timeout:     30s" in shown

    assert "changed: schedule, retry_count" in ays.ok(
        "task", "edit", name, "-s", "@every 1h", "--retries", "2"
    )
    assert "nothing changed" in ays.ok("task", "edit", name, "--retries", "2")
    assert "disabled (version 3)" in ays.ok("task", "disable", name)
    assert ays.json("task", "show", name)["enabled"] is False
    assert "enabled (version 4)" in ays.ok("task", "enable", name)
    task_id = ays.json("task", "show", name)["id"]
    assert ays.json("task", "show", str(task_id))["name"] == name  # by id too

    assert f"deleted task {name!r}" in ays.ok("task", "delete", name)
    gone = ays.run("task", "show", name)
    assert gone.returncode == 3
    assert gone.stderr == f"error: no task is named {name!r} (see: aysManager task list)\n"


def test_tags_are_given_on_add_replaced_on_edit_and_filter_the_list(ays: Ays) -> None:
    mark = f"m-{uuid.uuid4().hex[:8]}"  # this test's own tag: the daemons are shared
    both = ays.task("true", "--tag", mark, "--tag", "nightly,billing")
    other = ays.task("true", "--tag", mark)
    assert ays.json("task", "show", both)["tags"] == sorted([mark, "billing", "nightly"])
    assert f"tags:        billing, {mark}, nightly" in ays.ok("task", "show", both)

    assert [t["name"] for t in ays.json("task", "list", "--tag", mark)] == [both, other]
    assert [t["name"] for t in ays.json("task", "list", "--tag", mark, "--tag", "billing")] == [
        both
    ]
    header, *rows = ays.ok("task", "list", "--tag", mark).splitlines()
    assert "TAGS" in header.split()
    assert any(both in row and f"billing,{mark},nightly" in row for row in rows)

    assert "changed: tags" in ays.ok("task", "edit", both, "--tag", "ops")
    assert ays.json("task", "show", both)["tags"] == ["ops"]  # replaced, not added to
    assert "changed: tags" in ays.ok("task", "edit", both, "--no-tags")
    assert "tags:        none" in ays.ok("task", "show", both)

    bad = ays.run("task", "edit", other, "--tag", "Nightly")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: tags.0: 'Nightly' is not valid: 1-32 lowercase")
    both_ways = ays.run("task", "edit", other, "--tag", "a", "--no-tags")
    assert (both_ways.returncode, both_ways.stderr) == (
        2,
        "error: give --tag TAG or --no-tags, not both\n",
    )
    listed = ays.run("task", "list", "--tag", "Nightly")
    assert listed.returncode == 2 and listed.stderr.startswith("error: tag: 'Nightly'")


def test_a_task_allows_concurrent_retries_only_when_told(ays: Ays) -> None:
    name = ays.task("true", "--retries", "1", "--allow-concurrent-retry")
    assert ays.json("task", "show", name)["allow_concurrent_retry"] is True
    assert "a lost run's at once" in ays.ok("task", "show", name)
    assert "changed: allow_concurrent_retry" in ays.ok(
        "task", "edit", name, "--no-allow-concurrent-retry"
    )
    assert ays.json("task", "show", name)["allow_concurrent_retry"] is False
    assert ays.json("task", "show", ays.task("true"))["allow_concurrent_retry"] is False


def test_a_bad_field_is_refused_with_exit_2_naming_it_and_a_duplicate_name_with_exit_1(
    ays: Ays,
) -> None:
    bad = ays.run("task", "add", "bad-cron", "-g", "g1", "-s", "0 61 * * * *", "-c", "true")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: schedule: '0 61 * * * *' is not valid")
    missing = ays.run("task", "add", "no-group", "-s", "@daily", "-c", "true")
    assert (missing.returncode, missing.stderr) == (2, "error: a new task needs -g GROUP\n")
    name = ays.task("true")
    again = ays.run("task", "add", name, "-g", "g1", "-s", "@daily", "-c", "true")
    assert again.returncode == 1 and "already taken" in again.stderr
    assert "Traceback" not in bad.stderr + missing.stderr + again.stderr


def test_trigger_wait_prints_the_output_and_exits_with_the_jobs_exit_code(ays: Ays) -> None:
    name = ays.task("echo params=$AYS_PARAMS; exit 3")
    done = ays.run("task", "trigger", name, "--wait", "--params", "only-today")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "params=only-today\n"
    assert "failed" in done.stderr and "(exit 3)" in done.stderr

    fine = ays.task("echo fine")
    done = ays.run("task", "trigger", fine, "--wait")
    assert (done.returncode, done.stdout) == (0, "fine\n")


def test_trigger_wait_follows_the_retries_and_says_timed_out_with_124(ays: Ays) -> None:
    name = ays.task("sleep 30", "--timeout", "1", "--retries", "1", "--retry-interval", "0.2")
    done = ays.run("task", "trigger", name, "--wait")
    assert done.returncode == 124, done.stderr
    assert "retry 1 is run" in done.stderr
    runs = ays.json("run", "list", "--task", name)
    assert sorted((r["attempt"], r["status"]) for r in runs) == [(0, "timed_out"), (1, "timed_out")]


def test_trigger_without_wait_answers_the_run_at_once(ays: Ays) -> None:
    command, release = ays.gated("started", "done")
    name = ays.task(command)
    out = ays.ok("task", "trigger", name)
    run_id = int(out.rsplit("run ", 1)[1])
    assert ays.run_state(run_id)["status"] not in FINAL
    release.touch()
    wait_for(lambda: ays.run_state(run_id)["status"] == "succeeded", 60, "the run to succeed")


# --- runs ---------------------------------------------------------------------------------------


def test_logs_follow_shows_a_running_jobs_lines_as_it_writes_them_and_ends_with_the_job(
    ays: Ays,
) -> None:
    command, release = ays.gated("first-line", "second-line", code=4)
    name = ays.task(command)
    run_id = ays.json("task", "trigger", name)["job_log_id"]
    with subprocess.Popen(
        [AYS_MANAGER, "run", "logs", str(run_id), "-f", "--config", str(ays.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    ) as follower:
        try:
            lines = Lines(follower)
            lines.until("first-line")
            # The job cannot end before the release file exists: this line came live.
            assert ays.run_state(run_id)["status"] not in FINAL
            assert follower.poll() is None
            release.touch()
            lines.until("second-line")
            assert follower.wait(60) == 4  # the run's exit code, once it ended
            assert follower.stderr is not None
            assert "failed (exit 4)" in follower.stderr.read()
        finally:
            if follower.poll() is None:
                follower.kill()
    assert ays.ok("run", "logs", str(run_id)) == "first-line\nsecond-line\n"


def test_kill_ends_a_running_job_and_a_second_kill_says_it_had_ended(ays: Ays) -> None:
    command, release = ays.gated("running", "never")
    name = ays.task(command)
    run_id = ays.json("task", "trigger", name)["job_log_id"]
    wait_for(lambda: "running" in ays.output(run_id), 60, "the job to start")

    killed = ays.run("run", "kill", str(run_id), "--reason", "test says stop")
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout.startswith(f"run {run_id}: killed: killed on node")
    state = ays.run_state(run_id)
    assert state["status"] == "killed" and "test says stop" in state["message"]
    assert "never" not in state["output"]

    again = ays.run("run", "kill", str(run_id))
    assert again.returncode == 1 and "nothing to kill" in again.stderr
    release.touch()


def test_run_list_and_show_filter_and_describe_runs(ays: Ays) -> None:
    good = ays.task("echo good")
    bad = ays.task("echo bad; exit 1")
    ays.run("task", "trigger", good, "--wait")
    ays.run("task", "trigger", bad, "--wait")

    mine = ays.json("run", "list", "--task", bad, "--since", "1h")
    assert [(r["status"], r["exit_code"]) for r in mine] == [("failed", 1)]
    failed = ays.json("run", "list", "--status", "failed", "-n", "1000")
    assert mine[0]["id"] in {r["id"] for r in failed}
    assert good not in {r["task_id"] for r in failed}
    assert ays.json("run", "list", "--task", bad, "--until", "2000-01-01 00:00") == []

    table = ays.ok("run", "list", "--task", good)
    assert table.splitlines()[0].split()[:4] == ["RUN", "TASK", "SCHEDULED", "TRIGGER"]
    assert good in table and "succeeded" in table

    shown = ays.ok("run", "show", str(mine[0]["id"]))
    assert f"task:      {bad} (id {mine[0]['task_id']})" in shown
    assert shown.endswith("output:\nbad\n")
    assert ays.run("run", "list", "--since", "yesterday").returncode == 2


def test_a_table_fits_the_terminal_width_it_is_given(ays: Ays) -> None:
    ays.task("echo " + "a-very-long-argument " * 10)
    # 80: the task list's nine columns, each cut to its floor, take 78 (with two-digit ids).
    table = ays.run("task", "list", COLUMNS="80").stdout
    assert all(len(line) <= 80 for line in table.splitlines())
    assert "…" in table
    wide = ays.run("task", "list").stdout  # not a terminal: nothing is cut
    assert "a-very-long-argument " * 9 in wide


# --- history ------------------------------------------------------------------------------------


def test_history_lists_every_version_and_a_rollback_is_a_new_version(ays: Ays) -> None:
    name = ays.task("echo one")
    ays.ok("task", "edit", name, "-c", "echo two", "--timeout", "5")
    ays.ok("task", "disable", name)

    history = ays.json("task", "history", name)
    assert [(h["version"], h["change"], h["via"]) for h in history] == [
        (3, "updated", "api"),
        (2, "updated", "api"),
        (1, "created", "api"),
    ]
    assert history[0]["changed_by"].endswith(" (token)")  # user@host, as the CLI names it
    table = ays.ok("task", "history", name)
    assert "payload, timeout_s" in table and "enabled" in table

    out = ays.ok("task", "rollback", name, "--to", "1")
    assert "now version 4 (changed: payload, timeout_s, enabled)" in out
    task = ays.json("task", "show", name)
    assert (task["payload"]["command"], task["timeout_s"], task["enabled"]) == ("echo one", 0, True)
    assert ays.json("task", "history", name)[0]["via"] == "rollback"
    assert "nothing changed" in ays.ok("task", "rollback", name, "--to", "1")

    unknown = ays.run("task", "rollback", name, "--to", "99")
    assert unknown.returncode == 3 and "its versions are: 1, 2, 3, 4" in unknown.stderr

    ays.ok("task", "delete", name)
    after = ays.json("task", "history", name)
    assert after[0]["change"] == "deleted" and after[0]["task_id"] is None


# --- the manager, reaching it -------------------------------------------------------------------


def test_reconcile_asks_the_running_manager_and_prints_what_it_did(ays: Ays) -> None:
    out = ays.ok("reconcile")
    assert out.splitlines()[-1] == f"manager 127.0.0.1:{ays.manager_port}: 0 action(s) done"
    assert "nothing was changed" in ays.ok("reconcile", "--dry-run")


def test_node_list_shows_the_node(ays: Ays) -> None:
    nodes = ays.json("node", "list")
    assert [(n["address"], n["status"]) for n in nodes] == [
        (f"127.0.0.1:{ays.node_port}", "online")
    ]
    assert f"127.0.0.1:{ays.node_port}" in ays.ok("node", "list")


def test_unknown_runs_and_tasks_exit_3(ays: Ays) -> None:
    for args in (("run", "show", "999999"), ("run", "logs", "999999"), ("task", "enable", "nope")):
        done = ays.run(*args)
        assert done.returncode == 3, (args, done.stderr)
        assert done.stderr.startswith("error: ")


def test_a_manager_that_cannot_be_reached_or_refuses_the_token_exits_4(ays: Ays) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    done = cli("task", "list", "--url", closed, AYS_TOKEN=TOKEN)
    assert done.returncode == 4
    assert done.stderr.startswith(f"error: cannot reach the manager at {closed}")

    url = f"http://127.0.0.1:{ays.manager_port}"
    wrong = cli("task", "list", "--url", url, AYS_TOKEN="not-the-token")
    assert wrong.returncode == 4
    assert "refused the access token (from AYS_TOKEN)" in wrong.stderr
    assert "not-the-token" not in wrong.stderr + wrong.stdout

    right = cli("task", "list", "--json", AYS_URL=url, AYS_TOKEN=TOKEN)
    assert right.returncode == 0 and isinstance(json.loads(right.stdout), list)


def test_audit_shows_who_changed_a_task_and_which_fields(ays: Ays) -> None:
    name = ays.task("true")
    ays.ok("task", "edit", name, "--timeout", "30")
    entries = ays.json("audit", "--target", name)
    assert [e["action"] for e in entries] == ["task.updated", "task.created"]
    assert entries[0]["changed_fields"] == ["timeout_s"]
    assert entries[0]["who"].endswith("(token)") and "@" in entries[0]["who"]  # user@host
    table = ays.ok("audit", "--target", name, "--action", "task.updated")
    assert "task.updated" in table and "timeout_s" in table and "task.created" not in table
    bad = ays.run("audit", "--action", "task.exploded")
    assert bad.returncode == 2 and "task.exploded" in bad.stderr
