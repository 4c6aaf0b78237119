"""Connection and storage settings (pydantic), read from arguments or the environment."""

from __future__ import annotations

import os
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarmbus._messages import DEFAULT_MAX_MESSAGE_BYTES

ENV_PREFIX: Final = "SWARMBUS_"
#: The seed's MCP block names these without the SWARMBUS_ prefix.
SEED_ENV: Final = {
    "SWARM_BACKEND": "backend",
    "REDIS_URL": "redis_url",
    "DATABASE_URL": "database_url",
}
Backend = Literal["nats", "redis", "postgres"]


class Settings(BaseModel):
    """How swarmbus connects to NATS and provisions JetStream.

    Every field can be set from the environment: ``NATS_URL`` for ``url``,
    ``SWARM_BACKEND``, ``REDIS_URL`` and ``DATABASE_URL`` (the seed's names) for
    ``backend``, ``redis_url`` and ``database_url``, and ``SWARMBUS_<FIELD>`` (upper
    case) for the rest, e.g. ``SWARMBUS_REPLICAS=3``.
    Durable defaults: file storage; use 3 replicas on a cluster.

    ``backend`` says where coordination state lives (blackboard, task records, locks,
    proposals): NATS KV by default, or Redis / PostgreSQL; events stay on NATS.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = Field(None, description="NATS URL(s), comma separated; None = embedded")
    name: str | None = Field(None, description="connection name shown by the server")
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: str | None = Field(None, description="file holding an nkey seed")
    creds_file: str | None = Field(None, description="NATS .creds file (JWT + seed)")
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    inbox_prefix: str | None = Field(
        None,
        description="private reply inbox prefix, e.g. _INBOX_ops_deploy-validator",
        # a subject without wildcards (not the `.>` permission pattern)
        pattern=r"^([^.\s*>]+(\.[^.\s*>]+)*)?$",
    )
    replicas: int = Field(1, ge=1, le=5, description="replicas of swarmbus streams and buckets")
    storage: Literal["file", "memory"] = "file"
    event_max_age: float = Field(
        7 * 24 * 3600.0, gt=0, description="seconds the event stream keeps events"
    )
    event_max_bytes: int = Field(
        -1,
        ge=-1,
        description="bytes the event stream keeps, oldest dropped first (-1: bounded by "
        "event_max_age and the account's JetStream storage only); reserved x replicas "
        "against the account's storage",
    )
    event_max_consumers: int = Field(
        20_000,
        ge=1,
        description="consumers the event stream accepts: one per agent id, plus blackboard "
        "ingest and consensus intake (the server's default is 1,000); at most the "
        "account's max_consumers (20,000 in deploy/nats and the JWT account)",
    )
    task_max_consumers: int = Field(
        20_000,
        ge=1,
        description="consumers the task dispatch stream accepts: ten per session and task "
        "type (one per priority), each expiring task_consumer_inactive_threshold after its "
        "last pull (the server's default is 1,000); at most the account's max_consumers",
    )
    task_consumer_inactive_threshold: float = Field(
        900.0,
        ge=1.0,
        description="seconds a task queue's consumer (one per session, task type and "
        "priority) outlives its last pull; a queue that gets a dispatch later has it "
        "made again (by the claimer, or under the deploy auth configs by the service)",
    )
    dead_letter_max_age: float = Field(
        30 * 24 * 3600.0, gt=0, description="seconds the dead-letter stream keeps a refused message"
    )
    dead_letter_max_bytes: int = Field(
        1024**3,
        ge=1024 * 1024,
        description="bytes the dead-letter stream keeps (the oldest dead letters go first)",
    )
    consumer_inactive_threshold: float = Field(
        24 * 3600.0,
        gt=0,
        description="seconds an agent's event consumer outlives its last pull: an agent "
        "restarted within it resumes where it stopped; after it, the consumer is deleted",
    )
    consumer_group: str | None = Field(
        None,
        description="the durable event consumer shared by every agent served on a bus "
        "(one per process, not one per agent id; a restart resumes it): processes with "
        "the same name share the work, so they must serve the same agents. None: one "
        "consumer per agent id, named after it",
        pattern=r"^[A-Za-z0-9_-]{1,200}$",
    )
    pull_expires: float = Field(
        120.0,
        ge=2.0,
        description="seconds an idle consumer's long pull waits on the server, with an "
        "idle heartbeat at half of it (a pull lost silently is re-issued after two "
        "missed; a reconnect or a leader change ends it at once)",
    )
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0, le=8 * 1024 * 1024)
    request_timeout: float = Field(5.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    retry_for: float = Field(
        15.0,
        ge=0,
        description="seconds a JetStream call is retried through a leader election (0: never)",
    )
    backend: Backend = Field("nats", description="where coordination state lives (SWARM_BACKEND)")
    redis_url: str | None = Field(None, description="Redis URL for backend=redis (REDIS_URL)")
    database_url: str | None = Field(
        None, description="PostgreSQL URL for backend=postgres (DATABASE_URL)"
    )
    key_prefix: str = Field("agent:swarm:", description="prefix of every Redis key (the seed's)")

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_name(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backend_needs_url(self) -> Settings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend 'redis' needs redis_url (REDIS_URL=redis://host:6379/0)")
        if self.backend == "postgres" and not self.database_url:
            raise ValueError(
                "backend 'postgres' needs database_url (DATABASE_URL=postgresql://user@host/db)"
            )
        return self

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> Settings:
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file is set without tls_cert_file (the client certificate)")
        return self

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``NATS_URL``, the seed's ``SWARM_BACKEND`` / ``REDIS_URL`` /
        ``DATABASE_URL``, then ``SWARMBUS_*`` variables, then ``overrides``."""
        values: dict[str, object] = {}
        if os.environ.get("NATS_URL"):
            values["url"] = os.environ["NATS_URL"]
        for name, field in SEED_ENV.items():
            if os.environ.get(name):
                values[field] = os.environ[name]
        for field in cls.model_fields:
            env = os.environ.get(ENV_PREFIX + field.upper())
            if env is not None and field != "url":
                values[field] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    @property
    def servers(self) -> list[str]:
        """The server URLs to try."""
        return [u.strip() for u in (self.url or "").split(",") if u.strip()]
