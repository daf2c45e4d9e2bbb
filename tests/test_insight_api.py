"""The console's figures over HTTP (manager/insight_api.py): GET /overview, /forecast,
/forecast/tasks and /tasks/{id}/slots answer what the modules compute, with the token, and
refuse bad parameters with a 422 naming them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import JobLog
from tests.test_manager_api import Api, new_group, new_task, served_api


@pytest.fixture
def api(sessions: sessionmaker[Session]) -> Iterator[Api]:
    with served_api(sessions) as served:
        yield served


def test_the_overview_answers_the_dashboards_figures(api: Api) -> None:
    new_group(api)
    task = new_task(api)
    now = utcnow()
    with api.sessions() as session:
        session.execute(
            insert(JobLog),
            [
                {
                    "task_id": task["id"],
                    "scheduled_at": now - timedelta(minutes=2),
                    "created_at": now - timedelta(minutes=2),
                    "status": "failed",
                    "message": "exit 3",
                    "output": "",
                }
            ],
        )
        session.commit()
    response = api.client.get("/overview", params={"failures": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["nodes"] == [
        {"node_group": "node_group_ksa", "online": 0, "offline": 0, "unknown": 0}
    ]
    assert body["last_hour"]["by_status"]["failed"] == 1
    assert body["last_hour"]["success_rate"] == 0.0
    assert body["recent_failures"][0]["message"] == "exit 3"
    assert body["recent_failures"][0]["task_name"] == "nightly-report"
    assert body["generated_at"].endswith("Z") and len(body["timeline"]["fires"]) == 1440


def test_the_forecast_and_the_tasks_of_one_of_its_seconds(api: Api) -> None:
    new_group(api)
    for i in range(3):
        new_task(api, name=f"minutely-{i}", schedule="0 * * * * *")
    response = api.client.get("/forecast", params={"hours": 1, "threshold": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tasks"] == 3 and len(body["fires"]) == 60 and set(body["fires"]) == {3}
    pileup = body["pileups"][0]
    assert pileup["summary"].startswith("3 fires at :00 of every minute")
    at = pileup["first_at"]
    page = api.client.get("/forecast/tasks", params={"at": at, "limit": 2, "offset": 1})
    assert page.status_code == 200, page.text
    assert page.json()["total"] == 3
    assert [t["name"] for t in page.json()["items"]] == ["minutely-1", "minutely-2"]


def test_a_tasks_slots_over_a_range(api: Api) -> None:
    new_group(api)
    task = new_task(api, schedule="0 */10 * * * *")
    response = api.client.get(
        f"/tasks/{task['id']}/slots",
        params={"from": "2026-12-04T12:00:00Z", "to": "2026-12-04T13:00:00+00:00"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [s["scheduled_at"] for s in body["slots"]][:2] == [
        "2026-12-04T12:00:00Z",
        "2026-12-04T12:10:00Z",
    ]
    assert len(body["slots"]) == 6 and body["start"] == "2026-12-04T12:00:00Z"
    assert {s["outcome"] for s in body["slots"]} <= {"before_task", "not_fired", "upcoming"}
    default = api.client.get(f"/tasks/{task['id']}/slots")  # the last hour
    assert default.status_code == 200 and len(default.json()["slots"]) == 6


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/forecast", {"hours": 169}, "hours"),
        ("/forecast", {"threshold": 0}, "threshold"),
        ("/forecast/tasks", {}, "at"),
        ("/forecast/tasks", {"at": "0001-01-01T00:00:00Z"}, "at"),
        ("/overview", {"failures": 101}, "failures"),
        ("/tasks/{id}/slots", {"from": "2026-12-04T13:00:00Z", "to": "2026-12-04T12:00:00Z"}, "to"),
        ("/tasks/{id}/slots", {"from": "2026-01-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"}, "to"),
        ("/tasks/{id}/slots", {"from": "yesterday"}, "from"),
        ("/tasks/{id}/slots", {"to": "9999-12-31T23:59:59Z"}, "to"),
        ("/tasks/{id}/slots", {"late_after": "-1"}, "late_after"),
    ],
)
def test_bad_parameters_are_refused_naming_them(
    api: Api, path: str, params: dict[str, object], field: str
) -> None:
    new_group(api)
    task = new_task(api, schedule="0 * * * * *")
    response = api.client.get(path.replace("{id}", str(task["id"])), params=params)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


def test_a_missing_task_has_no_slots_and_no_route_answers_without_the_token(api: Api) -> None:
    assert api.client.get("/tasks/12345/slots").status_code == 404
    for path in ("/overview", "/forecast", "/forecast/tasks?at=2026-12-04T12:00:00Z"):
        assert httpx.get(f"{api.base_url}/api/v1{path}").status_code == 401
