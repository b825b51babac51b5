"""What the /_gateway resources answer, as pydantic models: each response is validated through
its model (``common.reply``), so the OpenAPI document and the real bodies cannot drift apart."""
from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from app.models.jobs import STATUSES as JOB_STATUSES
from app.models.webhooks import DELIVERY_STATUSES

T = TypeVar("T")

# RFC 3339 UTC with milliseconds, as app.models.base.isoformat writes it. Kept a string: a
# datetime would be re-serialised in another form than the one the domain functions produce.
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
JobStatus = Literal[tuple(JOB_STATUSES)]  # type: ignore[valid-type]
DeliveryStatus = Literal[tuple(DELIVERY_STATUSES)]  # type: ignore[valid-type]


class Resource(BaseModel):
    """A response body: a key the model does not name is an error (the document would lie)."""

    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """A problem details object (RFC 9457 section 3), ``application/problem+json``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    request_id: str | None = None


class FieldError(Resource):
    field: str = Field(description="The field's path, dot-separated (``requests.0.path``), or ``body``")
    message: str


class ValidationProblem(Problem):
    """A 422 problem: ``errors`` names each field that is wrong."""

    errors: list[FieldError] = Field(default_factory=list)


class Page(Resource, Generic[T]):
    """One page of a list, newest first; ``next_cursor`` is passed as ``?cursor=`` for the
    next page and is null on the last one."""

    data: list[T]
    next_cursor: str | None


class Consumer(Resource):
    id: str
    name: str
    plan: str | None
    disabled: bool
    created_at: Timestamp


class ApiKey(Resource):
    """An API key as listed: never the key itself."""

    id: str
    consumer: str = Field(description="The consumer's id")
    prefix: str = Field(description="The key's first characters, to recognise it")
    scopes: list[str]
    status: Literal["active", "expired", "revoked"]
    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None
    rotated_from: str | None


class NewApiKey(ApiKey):
    """A key just made: ``key`` is shown here once and never again."""

    key: str


class Progress(Resource):
    percent: int = Field(description="0-100")
    message: str | None


class JobRequest(Resource):
    method: str
    path: str
    query: str


class JobResultSummary(Resource):
    status: int = Field(description="The upstream's HTTP status")
    size: int | None = Field(description="The stored body's size in bytes")


class JobItemCounts(Resource):
    """A batch's sub-requests by status."""

    model_config = ConfigDict(extra="allow")  # one count per status present, besides the total

    total: int


class Job(Resource):
    """An async job (Microsoft REST API guidelines, long-running operations)."""

    id: str
    kind: Literal["request", "batch"]
    status: JobStatus
    progress: Progress
    route: str | None
    request_id: str | None
    attempts: int
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    expires_at: Timestamp | None
    error: Problem | None
    request: JobRequest | None = Field(default=None, description="A request job's call")
    result: JobResultSummary | None = Field(default=None, description="A request job's answer, once it has one")
    items: JobItemCounts | None = Field(default=None, description="A batch's sub-requests by status")
    resourceLocation: str | None = Field(default=None, description="The result URL, once the job succeeded")


class StoredResponse(Resource):
    status: int
    headers: list[list[str]] = Field(description="[name, value] pairs")
    body: str | None = Field(default=None, description="The body, when it is UTF-8 text")
    body_base64: str | None = Field(default=None, description="The body, when it is not UTF-8 text")


class BatchItem(Resource):
    index: int
    request: dict[str, Any]
    status: JobStatus
    error: Problem | None
    response: StoredResponse | None


class BatchResult(Resource):
    """A batch job's result: each sub-request with the upstream's response or its problem."""

    items: list[BatchItem]


class Endpoint(Resource):
    """A webhook endpoint: never its secret."""

    id: str
    url: str
    description: str
    event_types: list[str] = Field(description="Event type filters; empty: every type")
    disabled: bool
    disabled_reason: str | None
    disabled_at: Timestamp | None
    failing_since: Timestamp | None
    secret_rotating_until: Timestamp | None
    created_at: Timestamp
    updated_at: Timestamp


class NewEndpoint(Endpoint):
    secret: str = Field(description="``whsec_`` and base64: the key deliveries are signed with")


class EndpointSecret(Resource):
    secret: str


class RotatedSecret(Resource):
    secret: str
    previous_valid_until: Timestamp | None = Field(description="Until then deliveries are signed with both secrets")


class Message(Resource):
    """A published event."""

    id: str
    event_id: str | None = Field(description="The publisher's id, when it gave one")
    type: str
    created_at: Timestamp
    request_id: str | None


class MessageWithData(Message):
    data: Any


class MessageRef(Resource):
    """A delivery's message when its row is gone: the id alone."""

    id: str


class Attempt(Resource):
    """One try at sending a delivery; ``response`` is the receiver's answer, at most 4 KiB."""

    id: str
    delivery_id: str
    number: int
    trigger: str
    created_at: Timestamp
    duration_ms: int
    status_code: int | None
    succeeded: bool
    response: str | None
    error: str | None
    url: str
    address: str | None
    request_id: str | None


class Delivery(Resource):
    """A message's delivery to one endpoint, with its latest attempts, oldest first."""

    id: str
    endpoint_id: str
    message: Message | MessageRef
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: Timestamp | None
    last_attempt_at: Timestamp | None
    last_status_code: int | None
    last_error: str | None
    created_at: Timestamp
    finished_at: Timestamp | None
    attempts: list[Attempt]


class Purged(Resource):
    deleted: int = Field(description="Stored items removed (an entry and its Vary record count apart)")


class RouteFileInfo(Resource):
    """The route file a process is serving."""

    path: str = Field(description="GATEWAY_CONFIG, as this process reads it")
    digest: str = Field(description="SHA-256 of the file's bytes as validated (hex)")
    loaded_at: Timestamp = Field(description="When this process built it")
    routes: int
    upstreams: int


class Reloaded(RouteFileInfo):
    changed: bool = Field(description="false: the file is the one running; it is published to every process anyway")


class GatewayRoute(Resource):
    """A route of the running route file, as loaded (header rule values are not shown)."""

    index: int = Field(description="Its position in the route file's ``routes``")
    name: str | None
    label: str = Field(description="Its name, else its path: the route in logs, metrics and cache keys")
    path: str
    methods: list[str] | None = Field(description="null: every method")
    upstream: str | None = Field(description="null on an aggregate route")
    aggregate: dict[str, str] | None = Field(description="An aggregate route's calls: call name to upstream")
    mode: Literal["sync", "async"]
    auth: Literal["required", "optional", "none"]
    scopes: list[str]
    strip_prefix: bool
    match_headers: dict[str, str]
    rate_limit: str | None
    cache_ttl: float | None = Field(description="Seconds; null: no cache")


class GatewayRoutes(Resource):
    route_file: RouteFileInfo
    data: list[GatewayRoute]


class BreakerReading(Resource):
    """A target's circuit breaker now (shared by every process with Redis, else this process's)."""

    state: Literal["closed", "open", "half-open"]
    held_open: bool = Field(description="Held open by an operator until closed through this API")
    failures: int = Field(description="Consecutive failures counted")
    opened_at: Timestamp | None
    retry_in: float | None = Field(
        description="Seconds until a half-open probe is let through (0: the next request may be it); null when closed or held open"
    )


class GatewayTarget(Resource):
    id: str = Field(description="Names the target in URLs: derived from its URL, so it survives reloads")
    index: int = Field(description="Its position in ``targets`` (also accepted in URLs)")
    url: str
    breaker: BreakerReading


class Bulkhead(Resource):
    """An upstream's bulkhead in the process that answered (bulkheads are per process)."""

    in_flight: int
    max_concurrency: int


class BreakerSettings(Resource):
    fail_max: int
    reset_timeout: float = Field(description="Seconds")
    failure_statuses: list[int]


class GatewayUpstream(Resource):
    name: str
    targets: list[GatewayTarget]
    bulkhead: Bulkhead | None = Field(description="null: no max_concurrency")
    breaker: BreakerSettings
    timeout: dict[str, float] = Field(description="connect and read, seconds")
    retries: int = Field(description="Attempts in all (1: no retry)")
    routes: list[str] = Field(description="Labels of the routes that call it")


class GatewayProcess(Resource):
    pid: int = Field(description="The process that answered: bulkheads (and breakers without Redis) are its own")
    breakers_shared: bool = Field(description="true: breaker state lives in Redis, the same for every process")


class GatewayUpstreams(Resource):
    process: GatewayProcess
    data: list[GatewayUpstream]

