"""Portal pages for a consumer's jobs: the list by status, a job's page with its progress
(refreshed by htmx until the job is final), its result as a download, and cancelling it; the
services the API's ``/_gateway/jobs`` calls (``app.jobs.resource``, ``app.jobs.service``)."""
from __future__ import annotations

from flask import redirect, request, url_for

from app.api.common import found, page, with_status
from app.api.jobs import batch_item
from app.extensions import db
from app.jobs import resource, service
from app.models import Job
from app.models.jobs import BATCH, STATUSES
from app.portal.web import page as portal_page
from app.portal.web import render


def _own(session, job_id: str, payload: bool = False) -> Job:
    return found(resource.reachable(job_id, session.principal, payload), "job", job_id)


@portal_page("/jobs")
def jobs_page(session):
    """The consumer's jobs, newest first; ``?status=`` filters (comma-separated)."""
    query = with_status(resource.of_consumer(session.principal.consumer_id), Job.status, STATUSES)
    rows, next_cursor = page(query, Job, db.session)
    listed = [resource.job_json(row, urls=False) for row in rows]
    return render("jobs.html", session, jobs=listed, next_cursor=next_cursor, statuses=STATUSES, status=request.args.get("status", ""))


@portal_page("/jobs/<id:job_id>")
def job_page(session, job_id: str):
    """One job: status, progress, timings, error, and its result once it succeeded; htmx
    asks for the status block alone (``HX-Request``) every few seconds until it is final."""
    job = _own(session, job_id)
    data = resource.job_json(job, urls=False, items=resource.item_counts(job))
    template = "_job.html" if "HX-Request" in request.headers else "job.html"
    return render(template, session, job=data, final=job.final)


@portal_page("/jobs/<id:job_id>/result")
def job_result(session, job_id: str):
    """The job's result: the upstream's answer as it was stored (its status and content type),
    or a batch's items as JSON; 409 before the job has succeeded. JSON and plain text open in
    the browser, anything else (and ``?download=1``) is a download; either way the answer runs
    no script (CSP ``sandbox``): it is the upstream's content, not the portal's."""
    job = _own(session, job_id, payload=True)
    response = resource.result_response(job, batch_item)
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    readable = response.mimetype == "application/json" or response.mimetype.endswith("+json") or response.mimetype == "text/plain"
    if request.args.get("download") or not readable:
        name = f"{job.id}-result.json" if job.kind == BATCH else f"{job.id}-result"
        response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@portal_page("/jobs/<id:job_id>/cancel", methods=("POST",))
def cancel_job(session, job_id: str):
    """Cancel the job unless it has ended (409 then)."""
    service.cancel(_own(session, job_id))
    return redirect(url_for("portal.job_page", job_id=job_id), 303)
