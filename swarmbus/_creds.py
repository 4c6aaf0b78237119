"""Credentials for NATS decentralized (JWT) auth: one operator, one account, a signing
key per role, and a ``.creds`` file per agent.

The account JWT lists one *scoped* signing key per role (agent, service, observer);
each carries its role's permission template. A user JWT signed with a role's key gets
that template with ``{{name()}}`` replaced by the user's name (the agent id) and
``{{tag(x)}}`` by the values of its ``x:`` tags, so adding an agent only writes a new
user JWT: the server verifies it against the account JWT it already has (no config
edit, no restart). Revoking one updates the account JWT (``revocations``); the server
closes the agent's connections and refuses it once it has the new JWT. Measured on
nats-server 2.15.1: the ``full`` resolver takes it from a push on
``$SYS.REQ.CLAIMS.UPDATE`` by a system-account user (``swarmbus creds revoke --url``)
but does NOT re-read its directory on a config reload; the ``memory`` resolver takes it
from ``resolver_preload`` in server.conf on a config reload (``--reload-pid``, SIGHUP).

Layout of a credentials directory::

    operator.nk operator.jwt     the operator (trust root; keep operator.nk offline)
    account.nk account.jwt       the SWARMBUS account and its current JWT
    system.nk system.jwt         the system account (pushes, monitoring)
    system.creds                 a system-account user (to push account JWT updates)
    roles/<role>.nk              the scoped signing key of each role
    roles.yaml                   the role templates the account JWT was built from
    users.json                   agent id -> role, public key, creds file
    users/<file>.creds           one per agent (``creds_file_name``)
    limits.json                  the account's quotas (``DEFAULT_ACCOUNT_LIMITS``)
    .lock                        held while init, add or revoke rewrites the files
    server.conf                  the fragment to include in the nats-server config:
                                 operator JWT, system account, resolver, and the
                                 account JWTs as ``resolver_preload``

JWTs follow the NATS JWT v2 format (what ``nsc`` writes): ed25519 signatures by nkeys.
The ``nats-jwt`` package (0.2.2) has no scoped signing keys and writes user limits that
a scoped signer refuses, so the claims are built here as plain JSON.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from swarmbus import _subjects as subjects
from swarmbus._errors import (
    InvalidIdentifierError,
    MissingDependencyError,
    NotFoundError,
    SwarmbusError,
)

__all__ = [
    "DEFAULT_ACCOUNT_LIMITS",
    "DEFAULT_ROLES",
    "CredsStore",
    "UserEntry",
    "creds_file_name",
    "decode_jwt",
    "encode_jwt",
    "inbox_prefix",
]

ACCOUNT_NAME: Final = "SWARMBUS"
SYSTEM_ACCOUNT_NAME: Final = "SYS"
TOKEN_TAG: Final = "token"
HANDLER_TAG: Final = "handler"
CAPABILITY_TAG: Final = "capability"
_NO_LIMIT: Final = -1
_SECOND_NS: Final = 1_000_000_000
_CREDS_TEMPLATE: Final = (
    "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
    "************************* IMPORTANT *************************\n"
    "NKEY Seed printed below can be used to sign and prove identity.\n"
    "NKEYs are sensitive and should be treated as secrets.\n\n"
    "-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
    "*************************************************************\n"
)

# Account quotas (JWT account limits): the whole swarm shares them.
DEFAULT_ACCOUNT_LIMITS: Final[dict[str, Any]] = {
    "conn": 10_000,  # connections of the account (NATS has no per-user count)
    "subs": _NO_LIMIT,
    "data": _NO_LIMIT,
    "payload": 1024 * 1024,
    "leaf": 0,
    "imports": _NO_LIMIT,
    "exports": _NO_LIMIT,
    "wildcards": True,
    # JetStream storage of the account (all streams and buckets together)
    "mem_storage": 1024**3,
    "disk_storage": 20 * 1024**3,
    "streams": 64,
    "consumer": 20_000,
    "max_ack_pending": _NO_LIMIT,
    "mem_max_stream_bytes": _NO_LIMIT,
    "disk_max_stream_bytes": _NO_LIMIT,
    "max_bytes_required": False,
}

_SYSTEM_LIMITS: Final[dict[str, Any]] = {
    key: _NO_LIMIT for key in ("conn", "subs", "data", "payload", "leaf", "imports", "exports")
} | {"wildcards": True}

# Role templates: the permissions (and per-connection limits) of the users each role's
# scoped signing key signs. ``{{name()}}`` is the agent id; ``{{tag(token)}}`` its
# ``safe_token``, which is also the name of its one durable consumer on the event stream
# (Agent.serve; consumer names cannot hold '/'); ``{{tag(handler)}}`` is no longer used
# (accepted for creds issued before); ``{{tag(capability)}}`` the capabilities it serves.
_KV_READ_BUCKETS: Final = (
    "SWARMBUS_BOARD",
    "swarmbus-tasks",
    "SWARMBUS_CONSENSUS",
    "SWARMBUS_LOCKS",
)
_KV_WATCH_BUCKETS: Final = (*_KV_READ_BUCKETS, "SWARMBUS_QUERIES")
_OWN_CONSUMER: Final = "{{tag(token)}}"

_AGENT_PUB: Final[list[str]] = [
    "agent.*.*.*.{{name()}}",
    "swarmbus.request.*.*.*.{{name()}}",
    # the runtime API (`swarmbus up`) as itself; its answers come to its own inbox
    "swarmbus.api.*.*.*.{{name()}}",
    # answers: the requester's reply subject plus the responder's own id (CONTRACT.md
    # "Verified replies"), so no agent can answer in another's name
    "swarmbus.reply.*.*.*.{{name()}}",
    "swarmbus.dead.*.{{name()}}",
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.CONSUMER.INFO.*.*",  # read-only (KV watches look their consumers up)
    # its own durable consumer on the event stream, and only that one (attempt 7);
    # deleted when the agent leaves for good (serve(leave=True))
    f"$JS.API.CONSUMER.DURABLE.CREATE.SWARMBUS_EVENTS.{_OWN_CONSUMER}",
    f"$JS.API.CONSUMER.MSG.NEXT.SWARMBUS_EVENTS.{_OWN_CONSUMER}",
    f"$JS.API.CONSUMER.DELETE.SWARMBUS_EVENTS.{_OWN_CONSUMER}",
    f"$JS.ACK.SWARMBUS_EVENTS.{_OWN_CONSUMER}.>",
    # ephemeral consumers (KV watches and reads); not on the streams that hold named
    # consumers (_AGENT_PUB_DENY)
    "$JS.API.CONSUMER.CREATE.*",
    *(f"$JS.API.CONSUMER.MSG.NEXT.KV_{b}.*" for b in _KV_READ_BUCKETS),
    *(f"$JS.API.CONSUMER.DELETE.KV_{b}.*" for b in _KV_WATCH_BUCKETS),
    # task queue: the service creates the queue consumers (a create is also an update
    # of another queue's ack_wait or filter); agents pull and ack. See deploy/README.md
    # for what is still shared (an ack or +TERM of a dispatch it fetched: the task's
    # record survives it, and the service's sweep offers it again).
    "swarmbus.task.>",
    "$JS.API.CONSUMER.MSG.NEXT.SWARMBUS_TASKS.*",
    "$JS.ACK.SWARMBUS_TASKS.>",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.FC.>",
    "$KV.swarmbus-tasks.>",
    "$KV.SWARMBUS_LOCKS.>",
    # lock wakes (CONTRACT.md "Lock wakes"): a hint to try a compare-and-set, no authority
    "swarmbus.lock.>",
    "$KV.SWARMBUS_BOARD.>",
    "$KV.SWARMBUS_QUERIES.>",
    "$KV.SWARMBUS_CONSENSUS.m.*.{{name()}}",
]
_AGENT_PUB_DENY: Final[list[str]] = [
    # The ephemeral create takes a consumer name in its body and then updates that
    # consumer (filter, ack_wait): here it would reconfigure another agent's durable,
    # the consensus service's intake or a task queue's consumer.
    "$JS.API.CONSUMER.CREATE.SWARMBUS_EVENTS",
    "$JS.API.CONSUMER.CREATE.SWARMBUS_TASKS",
    "$JS.API.CONSUMER.CREATE.SWARMBUS_DEAD",
]
_AGENT_SUB: Final[list[str]] = [
    "agent.>",
    "swarmbus.task.>",
    "swarmbus.lock.>",  # lock wakes, a queue group per key
    "swarmbus.request.{{tag(capability)}}.any.*.*",
    "swarmbus.request.*.{{name()}}.*.*",
    "swarmbus.reply.{{name()}}.>",  # the answers to its own requests, read by it alone
    "_INBOX_{{name()}}.>",
]
_SERVICE_PUB: Final[list[str]] = [
    # `swarmbus up` acts for the agent its runtime API subject names (a subject the
    # agent's own permission binds to it: swarmbus.api.*.*.*.<agent>), so it publishes
    # events and dead letters in that agent's name.
    "agent.>",
    "swarmbus.request.*.*.*.{{name()}}",
    "swarmbus.reply.*.*.*.{{name()}}",
    "swarmbus.dead.>",
    "swarmbus.task.>",
    "swarmbus.lock.>",
    "$JS.API.>",
    "$JS.ACK.>",
    "$JS.FC.>",
    "$KV.>",
]
_SERVICE_PUB_DENY: Final[list[str]] = [
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.SWARMBUS_EVENTS",
    "$JS.API.STREAM.PURGE.SWARMBUS_DEAD",
    "$JS.API.STREAM.PURGE.SWARMBUS_TASKS",
    "$JS.API.STREAM.PURGE.KV_swarmbus-tasks",
    "$JS.API.STREAM.PURGE.KV_SWARMBUS_LOCKS",
    "$JS.API.STREAM.PURGE.KV_SWARMBUS_CONSENSUS",
    "$JS.API.STREAM.PURGE.KV_SWARMBUS_QUERIES",
    "$JS.API.STREAM.MSG.DELETE.>",
]
_OBSERVER_PUB: Final[list[str]] = [
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.CONSUMER.CREATE.*",
    "$JS.FC.>",
]

DEFAULT_ROLES: Final[dict[str, dict[str, Any]]] = {
    "agent": {
        "description": "one agent: publishes as itself, reads events, its own consumers",
        "tags": [TOKEN_TAG, HANDLER_TAG, CAPABILITY_TAG],
        "template": {
            "pub": {"allow": _AGENT_PUB, "deny": _AGENT_PUB_DENY},
            "sub": {"allow": _AGENT_SUB},
            "resp": {"max": 1, "ttl": 60 * _SECOND_NS},
            "subs": 1000,
            "data": _NO_LIMIT,
            "payload": 1024 * 1024,  # swarmbus's own message limit (DEFAULT_MAX_MESSAGE_BYTES)
        },
    },
    "service": {
        "description": "consensus service / runtime: provisions streams, never deletes",
        "tags": [],
        "template": {
            "pub": {"allow": _SERVICE_PUB, "deny": _SERVICE_PUB_DENY},
            "sub": {
                "allow": [
                    "agent.>",
                    "swarmbus.request.*.any.*.*",
                    "swarmbus.request.*.{{name()}}.*.*",
                    "swarmbus.reply.{{name()}}.>",
                    "swarmbus.api.>",  # the runtime API (`swarmbus up`, a queue group)
                    "swarmbus.task.>",
                    "swarmbus.lock.>",
                    "_INBOX_{{name()}}.>",
                ]
            },
            "resp": {"max": 1, "ttl": 60 * _SECOND_NS},
            "subs": 10_000,
            "data": _NO_LIMIT,
            "payload": 1024 * 1024,
        },
    },
    "observer": {
        "description": "reads events, dead letters and history; publishes nothing",
        "tags": [],
        "template": {
            "pub": {"allow": _OBSERVER_PUB},
            "sub": {"allow": ["agent.>", "swarmbus.dead.>", "_INBOX_{{name()}}.>"]},
            "subs": 1000,
            "data": _NO_LIMIT,
            "payload": 64 * 1024,
        },
    },
}


def _nkeys() -> Any:
    try:
        import nkeys
    except ImportError:
        raise MissingDependencyError("swarmbus creds", "creds") from None
    return nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _new_seed(kind: str) -> bytes:
    nkeys = _nkeys()
    prefix = {
        "operator": nkeys.PREFIX_BYTE_OPERATOR,
        "account": nkeys.PREFIX_BYTE_ACCOUNT,
        "user": nkeys.PREFIX_BYTE_USER,
    }[kind]
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), prefix)
    return seed


class _Key:
    """An nkey from its seed: public key and signatures."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self._pair = _nkeys().from_seed(bytearray(seed))
        self.public: str = self._pair.public_key.decode()

    def sign(self, data: bytes) -> bytes:
        signature: bytes = self._pair.sign(data)
        return signature


def encode_jwt(issuer: _Key, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT v2: ``nats`` claims of ``subject``, signed by ``issuer``."""
    body: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    # a unique id per token (nsc hashes the claims the same way; the server only reads it)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signed = f"{header}.{_b64(json.dumps(body).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT (not verified: only for reading our own files)."""
    try:
        claims: dict[str, Any] = json.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError) as exc:
        raise SwarmbusError(f"not a JWT: {exc}") from exc
    return claims


def inbox_prefix(agent: str) -> str:
    """The reply inbox prefix the role templates grant ``agent`` (``_INBOX_<agent id>``).

    The agent id as it is (``/`` is a valid subject character), so distinct ids never
    share an inbox (``ops/a`` and ``ops_a`` would, with ``/`` replaced).
    """
    return f"_INBOX_{subjects.validate_agent_id(agent)}"


def creds_file_name(agent: str) -> str:
    """File name of an agent's ``.creds`` (``ops/deploy-validator`` ->
    ``ops_deploy-validator-1cba3e87.creds``)."""
    return f"{subjects.safe_token(subjects.validate_agent_id(agent))}.creds"


@dataclass(frozen=True)
class UserEntry:
    """One issued user: who, with which role and key, and where its creds are."""

    agent: str
    role: str
    public_key: str
    creds_file: Path
    issued_at: int
    revoked: bool = False


class CredsStore:
    """A credentials directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # --- files -------------------------------------------------------------------------

    def _read(self, name: str) -> str:
        path = self.root / name
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            raise SwarmbusError(
                f"{path} is missing: run `swarmbus creds init {self.root}` first"
            ) from None

    def _write(self, name: str, text: str, *, secret: bool = False) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # readers (the server's resolver) never see half a file
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer of the directory at a time (processes and threads alike): ``add``,
        ``revoke`` and ``init`` read, change and rewrite users.json and account.jwt,
        and two at once lost users (then not revocable) and revocations."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _key(self, name: str) -> _Key:
        return _Key(self._read(name).encode())

    @property
    def account_public_key(self) -> str:
        return self._key("account.nk").public

    @property
    def system_account_public_key(self) -> str:
        return self._key("system.nk").public

    @property
    def account_jwt(self) -> str:
        return self._read("account.jwt")

    @property
    def system_creds(self) -> Path:
        return self.root / "system.creds"

    @property
    def server_config(self) -> Path:
        return self.root / "server.conf"

    @property
    def resolver(self) -> str:
        """``full`` or ``memory`` (how the server learns account updates)."""
        return self._read("resolver")

    def roles(self) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = yaml.safe_load(self._read("roles.yaml"))
        return data

    # --- init --------------------------------------------------------------------------

    def init(
        self,
        *,
        roles: dict[str, dict[str, Any]] | None = None,
        limits: dict[str, Any] | None = None,
        resolver: str = "full",
        resolver_dir: str | None = None,
    ) -> Path:
        """Create the operator, accounts, role keys and the server config fragment.

        Args:
            roles: role templates (default ``DEFAULT_ROLES``).
            limits: account quotas merged over ``DEFAULT_ACCOUNT_LIMITS``.
            resolver: ``full`` (account JWTs in a directory the server writes; updates
                by a push as the system user) or ``memory`` (account JWTs preloaded in
                ``server.conf``; updates by a config reload).
            resolver_dir: the full resolver's directory as the server sees it (each
                server its own, writable, e.g. ``/data/jwt`` in a container); default
                ``<root>/jwt``.

        Returns:
            The server config fragment (``server.conf``).
        """
        if resolver not in ("full", "memory"):
            raise SwarmbusError(f"resolver {resolver!r}: use full or memory")
        with self._locked():
            if (self.root / "operator.nk").exists():
                raise SwarmbusError(f"{self.root} already holds an operator; use another directory")
            operator = _Key(_new_seed("operator"))
            system = _Key(_new_seed("account"))
            account = _Key(_new_seed("account"))
            self._write("operator.nk", operator.seed.decode(), secret=True)
            self._write("system.nk", system.seed.decode(), secret=True)
            self._write("account.nk", account.seed.decode(), secret=True)
            self._write("roles.yaml", yaml.safe_dump(roles or DEFAULT_ROLES, sort_keys=False))
            for role in self.roles():
                self._write(f"roles/{role}.nk", _new_seed("account").decode(), secret=True)
            self._write(
                "limits.json", json.dumps({**DEFAULT_ACCOUNT_LIMITS, **(limits or {})}, indent=2)
            )
            operator_jwt = encode_jwt(
                operator,
                operator.public,
                "swarmbus",
                {"type": "operator", "system_account": system.public},
            )
            self._write("operator.jwt", operator_jwt)
            system_jwt = encode_jwt(
                operator,
                system.public,
                SYSTEM_ACCOUNT_NAME,
                {"type": "account", "limits": _SYSTEM_LIMITS},
            )
            self._write("system.jwt", system_jwt)
            self._write_account({})
            sys_seed = _new_seed("user")
            sys_user = _Key(sys_seed)
            sys_jwt = encode_jwt(
                system,
                sys_user.public,
                "swarmbus-admin",
                {"type": "user", "subs": -1, "data": -1, "payload": -1},
            )
            self._write(
                "system.creds",
                _CREDS_TEMPLATE.format(jwt=sys_jwt, seed=sys_seed.decode()),
                secret=True,
            )
            self._write("users.json", "{}\n")
            self._write("resolver-dir", resolver_dir or "")
            return self._write_server_config(resolver)

    def _write_server_config(self, resolver: str) -> Path:
        root = self.root.resolve()
        system = self.system_account_public_key
        lines = [
            "# swarmbus creds: operator mode (include this from the server config)",
            f'operator: "{self._read("operator.jwt")}"',
            f"system_account: {system}",
        ]
        if resolver == "full":
            resolver_dir = self._read("resolver-dir") or str(root / "jwt")
            lines += [
                "resolver: {",
                "  type: full",
                f'  dir: "{resolver_dir}"',
                "  allow_delete: false",
                '  interval: "2m"',
                '  timeout: "5s"',
                "}",
            ]
        else:
            lines.append("resolver: MEMORY")
        # a fresh resolver directory starts from these; pushes update the directory
        lines.append(self._preload())
        self._write("resolver", resolver)
        return self._write("server.conf", "\n".join(lines) + "\n")

    # --- account JWT -------------------------------------------------------------------

    def _write_account(self, revocations: dict[str, int]) -> str:
        account = self._key("account.nk")
        signing_keys = [
            {
                "kind": "user_scope",
                "key": self._key(f"roles/{role}.nk").public,
                "role": role,
                "template": spec["template"],
                "description": spec.get("description", ""),
            }
            for role, spec in self.roles().items()
        ]
        nats = {
            "type": "account",
            "limits": json.loads(self._read("limits.json")),
            "signing_keys": signing_keys,
            # users signed by the account key itself (not a role's) may do nothing
            "default_permissions": {"pub": {"deny": [">"]}, "sub": {"deny": [">"]}},
        }
        if revocations:
            nats["revocations"] = revocations
        token = encode_jwt(self._key("operator.nk"), account.public, ACCOUNT_NAME, nats)
        self._write("account.jwt", token)
        return token

    def _preload(self) -> str:
        preload = {
            self.account_public_key: self.account_jwt,
            self.system_account_public_key: self._read("system.jwt"),
        }
        return f"resolver_preload: {json.dumps(preload, indent=2)}"

    def _publish_account(self) -> None:
        """Write the current account JWT into server.conf (read on a reload or start)."""
        self._write_server_config(self.resolver)

    # --- users -------------------------------------------------------------------------

    def users(self) -> dict[str, UserEntry]:
        raw: dict[str, dict[str, Any]] = json.loads(self._read("users.json"))
        return {
            agent: UserEntry(
                agent=agent,
                role=entry["role"],
                public_key=entry["public_key"],
                creds_file=self.root / entry["creds_file"],
                issued_at=entry["issued_at"],
                revoked=entry.get("revoked", False),
            )
            for agent, entry in raw.items()
        }

    def _save_users(self, users: dict[str, UserEntry]) -> None:
        data = {
            u.agent: {
                "role": u.role,
                "public_key": u.public_key,
                "creds_file": str(u.creds_file.relative_to(self.root)),
                "issued_at": u.issued_at,
                "revoked": u.revoked,
            }
            for u in users.values()
        }
        self._write("users.json", json.dumps(data, indent=2) + "\n")

    def add(
        self,
        agent: str,
        role: str = "agent",
        *,
        handlers: list[str] | tuple[str, ...] = (),
        capabilities: list[str] | tuple[str, ...] = (),
    ) -> UserEntry:
        """Issue ``agent`` a user JWT signed by ``role``'s scoped key; write its creds.

        Args:
            agent: the agent id (the user's name, ``{{name()}}`` in the templates).
            role: a role of ``roles.yaml``.
            handlers: names of its event handlers (its durable consumers
                ``<safe_token(agent)>-<handler>``; agent role).
            capabilities: capabilities it serves (it may read their ``any`` requests).
        """
        subjects.validate_agent_id(agent)
        if agent == subjects.ANY:
            # `swarmbus.request.*.{{name()}}.*.*` would be every capability's `any` request
            raise InvalidIdentifierError("agent id", agent, "is the request target 'any'")
        roles = self.roles()
        if role not in roles:
            raise NotFoundError("role", role)
        for handler in handlers:
            subjects.validate_name("handler", handler)
        for capability in capabilities:
            subjects.validate_name("capability", capability)
        with self._locked():
            users = self.users()
            if agent in users and not users[agent].revoked:
                raise SwarmbusError(
                    f"{agent} already has credentials ({users[agent].creds_file}): "
                    "revoke them first (`swarmbus creds revoke`)"
                )
            seed = _new_seed("user")
            user = _Key(seed)
            tags = [f"{TOKEN_TAG}:{subjects.safe_token(agent)}"]
            tags += [f"{HANDLER_TAG}:{h}" for h in handlers]
            tags += [f"{CAPABILITY_TAG}:{c}" for c in capabilities]
            claims = {
                "type": "user",
                "issuer_account": self.account_public_key,
                # scoped users carry no permissions or limits of their own: the role's
                # template gives them
                "tags": tags,
            }
            token = encode_jwt(self._key(f"roles/{role}.nk"), user.public, agent, claims)
            path = self._write(
                f"users/{creds_file_name(agent)}",
                _CREDS_TEMPLATE.format(jwt=token, seed=seed.decode()),
                secret=True,
            )
            entry = UserEntry(agent, role, user.public, path, decode_jwt(token)["iat"])
            users[agent] = entry
            self._save_users(users)
            return entry

    def revoke(self, agent: str) -> str:
        """Revoke every user JWT issued to ``agent`` so far; return the new account JWT.

        The server applies it when it receives it (``push_subject``) or on a config
        reload (``nats-server --signal reload``); the agent's connections are closed.
        """
        with self._locked():
            users = self.users()
            entry = users.get(agent)
            if entry is None:
                raise NotFoundError("agent", agent)
            claims = decode_jwt(self.account_jwt)["nats"]
            revocations: dict[str, int] = copy.deepcopy(claims.get("revocations", {}))
            revocations[entry.public_key] = int(time.time())
            token = self._write_account(revocations)
            self._publish_account()
            users[agent] = UserEntry(
                entry.agent, entry.role, entry.public_key, entry.creds_file, entry.issued_at, True
            )
            self._save_users(users)
            entry.creds_file.unlink(missing_ok=True)
            return token
