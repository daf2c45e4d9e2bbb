"""The refusal log: refused requests logged once per source per minute, with a count."""

from __future__ import annotations

import logging

import pytest

from ays_runtime.web.refusals import RefusalLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def refusals(clock: Clock) -> RefusalLog:
    return RefusalLog("manager 10.0.0.1:18080", logging.getLogger("ays.test.refusals"), 60, clock)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ays.test.refusals"]


def test_the_first_refusal_from_a_source_is_logged_at_once_with_what_was_wrong(
    refusals: RefusalLog, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        refusals.refused("10.0.0.7", 401, "GET /api/v1/tasks", "bad or missing access token")
    assert lines(caplog) == [
        "manager 10.0.0.1:18080: refused GET /api/v1/tasks from 10.0.0.7: "
        "bad or missing access token (401)"
    ]


def test_refusals_within_a_minute_are_counted_and_said_in_one_line_when_it_ends(
    refusals: RefusalLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        refusals.refused("10.0.0.7", 401, "GET /api/v1/tasks", "bad or missing access token")
        for _ in range(57):
            clock.now += 1
            refusals.refused("10.0.0.7", 401, "GET /api/v1/tasks", "bad or missing access token")
        refusals.refused("10.0.0.7", 422, "POST /api/v1/tasks", "timeout_s: too big")
        assert len(lines(caplog)) == 1
        clock.now += 5  # the minute is over: the next look closes it
        refusals.close_due()
    first, summary = lines(caplog)
    assert summary == (
        "manager 10.0.0.1:18080: refused 58 more request(s) from 10.0.0.7 in the last 62 s "
        "(401 x57, 422 x1); the last: POST /api/v1/tasks: timeout_s: too big (422)"
    )


def test_a_source_refused_without_end_gets_one_line_per_minute(
    refusals: RefusalLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(600):  # ten minutes, one refusal a second
            refusals.refused("10.0.0.7", 401, "POST /api/v1/jobs", "bad or missing access token")
            clock.now += 1
        refusals.close_due()
    said = lines(caplog)
    assert 10 <= len(said) <= 12, said
    assert sum(int(line.split("refused ")[1].split(" ")[0]) for line in said[1:]) == 599


def test_sources_are_counted_apart_and_a_quiet_one_is_logged_at_once_again(
    refusals: RefusalLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        refusals.refused("10.0.0.7", 413, "POST /api/v1/tasks", "a body of 2097152 bytes")
        refusals.refused("10.0.0.8", 413, "POST /api/v1/tasks", "a body of 2097152 bytes")
        clock.now += 61
        refusals.close_due()  # nothing more came from either: no summary
        refusals.refused("10.0.0.7", 401, "GET /api/v1/nodes", "bad or missing access token")
    assert [line.split(" from ")[1].split(":")[0] for line in lines(caplog)] == [
        "10.0.0.7",
        "10.0.0.8",
        "10.0.0.7",
    ]
