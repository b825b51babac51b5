"""Configuration: defaults, then the environment, with Heroku's URLs normalised."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from flask import Flask
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MiB = 1024 * 1024


def defaults(app: Flask) -> dict:
    """Return the default configuration for ``app``; every key can be overridden.

    Sizes are bytes, times are seconds. ``SQLALCHEMY_DATABASE_URI`` defaults to SQLite
    under the instance folder (the embedded default).
    """
    instance = Path(app.instance_path)
    return {
        "API_PREFIX": "/_gateway",
        "CONFIG": "gateway.yaml",  # the route file; env GATEWAY_CONFIG
        "MAX_BODY_SIZE": 10 * MiB,  # request bodies above this answer 413
        # The gateway's own API (API_PREFIX): a JSON request body larger than this (bytes)
        # answers 413 before it is read; POST /jobs, whose body carries requests for the routes,
        # takes MAX_BODY_SIZE instead. Arrays and objects nested deeper than API_MAX_JSON_DEPTH
        # levels answer 400 (at most 200, where the JSON parser stops by itself).
        "API_MAX_BODY_SIZE": 1 * MiB,
        "API_MAX_JSON_DEPTH": 64,
        # Pages on other origins that may call the gateway's own API (app.gateway.cors: exact
        # origins, "https://*.example.com", or "*"); none by default. With credentials, cookies
        # and HTTP authentication go along; MAX_AGE is seconds a browser reuses a preflight.
        "API_CORS_ORIGINS": [],
        "API_CORS_CREDENTIALS": False,
        "API_CORS_MAX_AGE": 600,
        # A portal sign-in lasts at most this long (seconds), and never past its credential's
        # expiry; signing out, revoking the key or disabling the consumer ends it sooner.
        "PORTAL_SESSION_LIFETIME": 8 * 3600.0,
        # Request bodies up to this size are read into memory so that a retry can resend them;
        # larger ones stream to the upstream and are never retried once sending has started.
        "BUFFER_BODY_SIZE": 64 * 1024,
        "WEB_THREADS": 8,  # gunicorn gthread threads per worker; sizes each upstream's pool
        "TRUSTED_PROXY_HOPS": 0,  # proxies in front of the gateway whose X-Forwarded-For/-Proto/-Port are believed
        # X-Forwarded-Host is believed from this many proxies, apart: Heroku's router sets
        # X-Forwarded-For/-Proto/-Port but passes a client's own X-Forwarded-Host on.
        "TRUSTED_FORWARDED_HOST_HOPS": 0,
        "KEY_PREFIX": "frontdoor",  # namespace of every Redis key the gateway writes
        # With Redis, a process acts on a breaker reading up to this old (seconds) when its
        # calls succeed; failures always read and write the shared state at once.
        "BREAKER_SYNC_INTERVAL": 0.2,
        # A route file reload or a breaker an operator holds open or closes (the admin API) in
        # one process is applied by every other process within this many seconds: each one
        # reads the shared record (Redis, else the database) at most this often, on a request.
        "CONTROL_SYNC_INTERVAL": 1.0,
        "VIA_NAME": "frontdoor",  # the pseudonym in the Via header (RFC 9110 section 7.6.3)
        "REDIS_URL": None,
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{instance / 'frontdoor.sqlite'}",
        # hide_parameters: a failed statement's error (logged with its traceback) leaves out the
        # bound values, which may be a job's stored request or a key's hash.
        "SQLALCHEMY_ENGINE_OPTIONS": {"hide_parameters": True},
        "CELERY_BROKER_URL": None,  # derived from REDIS_URL, else SQLite under instance/
        # Identity. A verified key (or a JWT's consumer) is kept in each process this many
        # seconds: revoking a key or disabling a consumer takes effect everywhere within it.
        "AUTH_CACHE_TTL": 5.0,
        "AUTH_CACHE_SIZE": 10_000,  # cached keys and consumers per process
        # While the database cannot be reached, a key or consumer verified up to this many
        # seconds ago is still served from the cache (0: never); older ones answer 503.
        "AUTH_CACHE_STALE": 60.0,
        # PostgreSQL only: a connection attempt gives up after this many seconds (libpq's
        # connect_timeout, at least 2), so an unreachable database fails fast into a 503.
        "DATABASE_CONNECT_TIMEOUT": 3,
        # A pooled connection left idle longer than this (seconds) is tested before use, so the
        # first requests after the database comes back get a new one; one in steady use is not
        # (a round trip saved per checkout), and fails the one statement that finds it dead.
        "DATABASE_PING_AFTER": 1.0,
        "AUTH_REALM": "frontdoor",  # the realm in WWW-Authenticate (RFC 6750 section 3)
        "JWT_SECRET": None,  # HS256 shared secret; tokens are accepted only when this or JWKS is set
        "JWT_JWKS_URL": None,  # RS256/ES256 public keys (JSON Web Key Set, RFC 7517)
        "JWT_AUDIENCE": None,
        "JWT_ISSUER": None,
        "JWT_LEEWAY": 0.0,  # seconds of clock skew allowed on exp/nbf
        "JWKS_CACHE_SECONDS": 300.0,
        "JWKS_REFRESH_COOLDOWN": 5.0,  # least seconds between refetches forced by an unknown kid
        # Rate limits, in the limits library's notation ("100/minute;10/second"; "" for none),
        # per consumer, or per client IP for anonymous callers, across all routes. A plan's
        # limit replaces the default for its consumers; the plan "anonymous", when defined,
        # applies to callers without credentials. A route's rate_limit replaces both on it.
        # Off unless set, as in Kong and KrakenD: a gateway should not answer 429s nobody asked for.
        "RATELIMIT_DEFAULT": "",
        "RATELIMIT_PLANS": {},  # {"free": "60/minute", "pro": "600/minute;20/second"}
        "RATELIMIT_STRATEGY": "sliding-window-counter",  # two counters per limit and key; or "moving-window" (exact, an entry per hit)
        "RATELIMIT_STORAGE_URI": None,  # default: REDIS_URL, else memory:// (one process's own)
        "RATELIMIT_FAIL_OPEN": True,  # storage unreachable: let requests through (False: 503)
        "RATELIMIT_OUTAGE_LOG_INTERVAL": 60.0,  # seconds between log lines about an outage
        # Response cache (routes with cache:). Without Redis each process keeps its own LRU.
        "CACHE_MAX_BYTES": 64 * MiB,  # the in-process LRU's size
        "CACHE_LOCK_WAIT": 5.0,  # seconds concurrent misses for one key wait for the first
        # With Redis: seconds a process keeps what it read from the shared cache (0: off), and
        # bytes it keeps at most; another process's purge reaches it within the seconds.
        "CACHE_NEAR_TTL": 1.0,
        "CACHE_NEAR_MAX_BYTES": 16 * MiB,
        "AGGREGATE_THREADS": 32,  # each process's pool for the backend calls of aggregate routes
        # Celery worker on SIGTERM (REMAP_SIGTERM=SIGQUIT in the Procfile): running tasks get this
        # many seconds, then the messages of those still running go back on the queue at once.
        "WORKER_SOFT_SHUTDOWN_TIMEOUT": 25.0,
        "WORKER_SOFT_SHUTDOWN_ON_IDLE": False,  # wait out the timeout even with no task running
        "WORKER_METRICS_PORT": None,  # a Celery worker serves its metrics on this port (on HOST)
        # Async jobs. Times are seconds, sizes bytes.
        "JOB_RETRY_AFTER": 1,  # the Retry-After a client is told while a job is not final
        "JOB_RESULT_TTL": 24 * 3600.0,  # a final job's result is kept this long, then 410
        "JOB_RETENTION": 7 * 24 * 3600.0,  # after expiry the row (answering 410) is kept this long, then 404
        "JOB_MAX_RESULT_SIZE": 10 * MiB,  # a larger upstream body fails the job ("result-too-large")
        "JOB_BATCH_MAX": 100,  # sub-requests in one batch job
        "JOB_BATCH_CONCURRENCY": 4,  # sub-requests of one batch in flight at once
        "JOB_SOFT_TIME_LIMIT": 600.0,  # a job still running after this fails with "job-timeout"
        "JOB_TIME_LIMIT": 660.0,  # the worker process is killed; beat marks the job failed
        # A running job's claim: renewed every third of this while its worker lives. A job
        # whose claim lapsed (its worker died) is enqueued again by beat, up to MAX_ATTEMPTS.
        "JOB_LEASE": 30.0,
        "JOB_MAX_ATTEMPTS": 3,
        "JOB_REQUEUE_AFTER": 60.0,  # a job still notStarted this long after its enqueue is enqueued again
        "JOB_SWEEP_INTERVAL": 10.0,  # how often beat looks for stuck and expired jobs
        # GET /_gateway/jobs/{id}?wait=N answers once the job is final or N s have passed: N is
        # capped here, inside the 30 s a router (Heroku's) gives a request. The wait holds a web thread.
        "JOB_WAIT_MAX": 20.0,
        # Webhooks. Times are seconds, sizes bytes.
        # Fernet keys (or passphrases of 32+ characters), comma-separated, newest first: the
        # first encrypts endpoint secrets, every one decrypts. Required unless the database is
        # the embedded SQLite, which keeps a generated key in instance/webhook-secret.key.
        "WEBHOOK_SECRET_KEYS": None,
        "WEBHOOK_TIMEOUT": 15.0,  # one attempt's HTTP exchange: connecting, sending, the answer
        # Delays before each retry after the first attempt (Svix's: 5 s, 5 min, 30 min, 2 h,
        # 5 h, 10 h, 10 h), each varied by +/- WEBHOOK_RETRY_JITTER (a fraction).
        "WEBHOOK_RETRY_SCHEDULE": [5, 300, 1800, 7200, 18000, 36000, 36000],
        "WEBHOOK_RETRY_JITTER": 0.1,
        "WEBHOOK_MAX_RETRY_AFTER": 36000.0,  # the longest Retry-After (429/503) a retry waits
        "WEBHOOK_DISABLE_AFTER": 5 * 24 * 3600.0,  # an endpoint failing this long is disabled
        "WEBHOOK_SECRET_OVERLAP": 24 * 3600.0,  # after a rotation the old secret signs too, this long
        # Requests in flight to one endpoint across all workers: what one receiver gets at once.
        # A claim takes up to half of an endpoint's slots, so a slow receiver mostly holds two
        # batches (their threads, and their worker processes until WEBHOOK_TIMEOUT).
        "WEBHOOK_ENDPOINT_CONCURRENCY": 10,
        # Deliveries a worker process claims and sends at once (one statement claims them, one
        # records them); each is sent on a thread of its own, over pooled keep-alive connections.
        "WEBHOOK_BATCH_SIZE": 20,
        # Seconds a fan-out waits for more events when they arrive faster than fan-outs start
        # (never for one event at a time, nor for a backlog): bigger batches, this much later.
        "WEBHOOK_FAN_OUT_LINGER": 0.02,
        # An attempt not recorded by then is taken as lost and retried; at least WEBHOOK_TIMEOUT + 6.
        "WEBHOOK_LEASE": 60.0,
        "WEBHOOK_REQUEUE_AFTER": 30.0,  # a due delivery or a message enqueued but not picked up by then is sent again
        "WEBHOOK_DISPATCH_INTERVAL": 2.0,  # how often beat sends due retries and redoes lost work
        "WEBHOOK_SWEEP_INTERVAL": 3600.0,  # how often beat deletes old deliveries
        "WEBHOOK_RETENTION": 30 * 24 * 3600.0,  # finished deliveries, attempts and messages are kept this long
        "WEBHOOK_MAX_PAYLOAD": 256 * 1024,  # an event's data, as JSON
        # Postgres: an event is answered once its message is committed; true: once its commit is
        # also on disk (README, "How deliveries survive failures").
        "WEBHOOK_EVENT_SYNCHRONOUS_COMMIT": False,
        "WEBHOOK_MAX_ENDPOINTS": 100,  # per consumer
        # The SSRF guard: only https receivers with public addresses, unless these allow more.
        "WEBHOOK_ALLOW_HTTP": False,  # http:// URLs too (development)
        "WEBHOOK_ALLOWED_NETWORKS": [],  # CIDR networks receivers may be in anyway ("10.0.0.0/8,::1/128")
        "WEBHOOK_VERIFY_TLS": True,
        "WEBHOOK_CA_BUNDLE": None,  # a CA file to verify receivers' certificates with, instead of the system's
    }


PREFIX = "GATEWAY_"
# Settings read with config.get, without a default in ``defaults``: their types.
OPTIONAL = {"CELERY": dict, "LOG_LEVEL": str, "WORKER_METRICS_PORT": int}
# Read by gunicorn.conf.py before any app exists (app.server.ClientLimits checks them).
CLIENT_LIMITS = ("CLIENT_HEADER_TIMEOUT", "CLIENT_BODY_TIMEOUT", "CLIENT_BODY_BUFFER_SIZE")


class SettingsError(ValueError):
    """Variables of the environment that are not settings, or whose values do not fit: one line each."""


def _expected(kind: type) -> str:
    return {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "text",
        list: "a JSON list, or values separated by commas",
        dict: "a JSON object",
    }[kind]


def environment_settings(app: Flask, environ: dict[str, str]) -> dict:
    """The ``GATEWAY_*`` variables of ``environ`` as settings, each of the type its default has
    (``defaults``): ``{"JOB_LEASE": 30.0, ...}``. Lists, objects and settings without a typed
    default are read as JSON where they parse (as Flask's ``from_prefixed_env``), text settings
    as they are; ``GATEWAY_A__B`` sets key B of the object A.

    Raises SettingsError naming every variable that is not a setting (with the nearest one's
    name when there is one) or whose value is not of the expected form, one line each.
    """
    import difflib
    import json

    from pydantic import TypeAdapter

    defaulted = defaults(app)
    typed = {**{key: type(value) for key, value in defaulted.items() if value is not None}, **OPTIONAL}
    known = set(defaulted) | set(OPTIONAL)
    found: dict = {}
    problems = []
    for variable in sorted(environ):
        if not variable.startswith(PREFIX):
            continue
        raw = environ[variable]
        key = variable.removeprefix(PREFIX)
        top, _, below = key.partition("__")
        if top in CLIENT_LIMITS:
            continue
        if top not in known:
            near = difflib.get_close_matches(top, sorted(known | set(CLIENT_LIMITS)), n=1, cutoff=0.75)
            hint = f"; did you mean {PREFIX}{near[0]}?" if near else " (README: Configuration lists them)"
            problems.append(f"{variable} is not a setting{hint}")
            continue
        kind = typed.get(top)
        if kind is str and not below:
            found[top] = raw
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if below:
            if kind not in (None, dict):
                problems.append(f"{variable}: {PREFIX}{top} is not an object, so it has no key {below!r}")
                continue
            nested = found.setdefault(top, dict(app.config.get(top) or {}))
            *parents, last = below.split("__")
            for part in parents:
                nested = nested.setdefault(part, {})
            nested[last] = value
            continue
        if kind is None:
            found[top] = value
            continue
        if kind is list and isinstance(value, str):
            found[top] = value  # comma-separated, split where the setting is read
            continue
        try:
            found[top] = TypeAdapter(kind).validate_python(value)
        except ValidationError:
            problems.append(f"{variable}={raw!r} is not {_expected(kind)} (the default is {defaulted.get(top)!r})")
    problems += platform_problems(environ)
    if problems:
        raise SettingsError("\n".join(problems))
    return found


# The platform's own variables (Heroku's, and the process manager's), as the processes read them:
# name -> (default, what a value must be, its check).
_URL_SCHEMES = {
    "DATABASE_URL": ("postgres", "postgresql", "postgresql+psycopg", "sqlite"),
    "REDIS_URL": ("redis", "rediss", "unix"),
}


class Platform(BaseModel):
    """The platform's variables: ``PORT``, ``HOST``, ``WEB_CONCURRENCY`` (gunicorn processes),
    ``WEB_THREADS`` (threads each), ``WORKER_CONCURRENCY`` (Celery processes),
    ``GUNICORN_TIMEOUT`` (seconds), ``DATABASE_URL`` and ``REDIS_URL`` (the add-ons' URLs)."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    PORT: Annotated[int, Field(ge=0, le=65535)] = 8000  # 0: any free port
    HOST: Annotated[str, Field(min_length=1)] = "0.0.0.0"
    WEB_CONCURRENCY: Annotated[int, Field(ge=1, le=512)] = 2
    WEB_THREADS: Annotated[int, Field(ge=1, le=1024)] = 8
    WORKER_CONCURRENCY: Annotated[int, Field(ge=1, le=512)] = 4
    GUNICORN_TIMEOUT: Annotated[int, Field(ge=1)] = 35
    DATABASE_URL: str | None = None
    REDIS_URL: str | None = None

    @field_validator("DATABASE_URL", "REDIS_URL")
    @classmethod
    def _url(cls, value: str | None, info) -> str | None:
        schemes = _URL_SCHEMES[info.field_name]
        if value is not None and value.partition("://")[0].lower() not in schemes:
            raise ValueError(f"a URL starting {' or '.join(scheme + '://' for scheme in schemes)}")
        return value


def _platform_values(environ: dict[str, str]) -> dict[str, str]:
    return {name: environ[name] for name in Platform.model_fields if environ.get(name)}


def platform_problems(environ: dict[str, str]) -> list[str]:
    """One line per platform variable of ``environ`` whose value does not fit ``Platform``."""
    values = _platform_values(environ)
    try:
        Platform(**values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0])
            field = Platform.model_fields[name]
            if field.annotation is int:
                low = next((rule.ge for rule in field.metadata if hasattr(rule, "ge")), None)
                high = next((rule.le for rule in field.metadata if hasattr(rule, "le")), None)
                form = f"a whole number from {low} to {high}" if high is not None else f"a whole number of at least {low}"
            else:
                form = error["msg"].removeprefix("Value error, ")
            told = f"the default is {field.default!r}" if field.default is not None else "unset: the embedded default"
            shown = re.sub(r"//[^/@]*@", "//***@", values[name])  # a URL's password is never printed
            lines.append(f"{name}={shown!r} is not valid: expected {form} ({told})")
        return lines
    return []


def from_environment(app: Flask) -> None:
    """Read ``GATEWAY_*`` variables and the platform's own (Heroku-style) into ``app.config``.

    ``GATEWAY_X`` sets ``X``, checked and typed by ``environment_settings`` (raises
    SettingsError). ``DATABASE_URL``, ``REDIS_URL``, ``PORT`` and ``WEB_THREADS`` are read by
    their platform names.
    """
    app.config.update(environment_settings(app, dict(os.environ)))  # the platform's checked too
    platform = Platform(**_platform_values(dict(os.environ)))
    if platform.DATABASE_URL:
        app.config["SQLALCHEMY_DATABASE_URI"] = platform.DATABASE_URL
    if platform.REDIS_URL:
        app.config["REDIS_URL"] = platform.REDIS_URL
    if os.environ.get("PORT"):
        app.config["PORT"] = platform.PORT
    if os.environ.get("WEB_THREADS"):
        app.config["WEB_THREADS"] = platform.WEB_THREADS


def finalise(app: Flask) -> None:
    """Derive the settings that follow from others; run after every source is applied."""
    uri = normalise_database_url(app.config["SQLALCHEMY_DATABASE_URI"])
    app.config["SQLALCHEMY_DATABASE_URI"] = uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not app.config["CELERY_BROKER_URL"]:
        redis_url = app.config["REDIS_URL"]
        broker = Path(app.instance_path) / "celery-broker.sqlite"
        app.config["CELERY_BROKER_URL"] = redis_url or f"sqla+sqlite:///{broker}"
    broker_url = app.config["CELERY_BROKER_URL"]
    if broker_url.startswith("sqla+sqlite:///"):
        Path(broker_url.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def normalise_database_url(url: str) -> str:
    """Return ``url`` in a form SQLAlchemy 2 accepts, using psycopg 3 for PostgreSQL.

    Heroku hands out ``postgres://`` URLs, a scheme SQLAlchemy 1.4+ refuses.

    >>> normalise_database_url("postgres://u:p@h:5432/d")
    'postgresql+psycopg://u:p@h:5432/d'
    """
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def trusted_hops(config: dict, name: str) -> int:
    """The proxy count setting ``name`` (TRUSTED_PROXY_HOPS, TRUSTED_FORWARDED_HOST_HOPS) as a
    whole number of proxies; raises ValueError naming the setting for anything else."""
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"GATEWAY_{name} must be a whole number of proxies (0 or more), not {value!r}")
    return value
