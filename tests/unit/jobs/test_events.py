"""The outbox: one JobEvent row per job that ends, written with its final state."""
from __future__ import annotations

import pytest

from tests.unit.jobs.support import PREFIX, events, run


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app(request, jobs_app):
    """The job app on SQLite, and on PostgreSQL, where a request job's end and its event are
    one statement."""
    if request.param == "sqlite":
        return jobs_app()
    return jobs_app(SQLALCHEMY_DATABASE_URI=request.getfixturevalue("postgres_database"))


@pytest.mark.parametrize(
    ("path", "status"),
    [("/async/anything", "succeeded"), ("/dead/anything", "failed"), ("/async/anything", "canceled")],
)
def test_a_job_that_ends_writes_exactly_one_event_with_its_final_state(app, client, identity, upstream, path, status):
    consumer = identity.consumer()
    key = identity.key(consumer)
    job_id = client.post(path, headers={"X-API-Key": key}).json["id"]
    assert events(app) == []

    if status == "canceled":
        assert client.delete(f"{PREFIX}/{job_id}", headers={"X-API-Key": key}).status_code == 200
    else:
        assert run(app, job_id) == status
    run(app, job_id)  # a second message for an ended job adds nothing

    (event,) = events(app)
    assert event.job_id == job_id
    assert event.type == f"job.{status}"
    assert event.consumer_id == consumer
    assert event.published_at is None
    assert event.data["id"] == job_id
    assert event.data["status"] == status
    assert "resourceLocation" not in event.data  # no request, so no URLs
    if status == "failed":
        assert event.data["error"]["status"] == 502
    # The event shows the job as it ended: as its resource reads now, less the result's URL.
    shown = client.get(f"{PREFIX}/{job_id}", headers={"X-API-Key": key}).json
    shown.pop("resourceLocation", None)
    assert event.data == shown


def test_a_job_not_yet_ended_has_no_event(app, client, upstream):
    client.post("/async/anything")

    assert events(app) == []
