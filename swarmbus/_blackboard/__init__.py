"""The blackboard: one session's shared workspace on the state store (a JetStream KV
bucket by default; Redis or PostgreSQL with ``SWARM_BACKEND``).

Key layout (one bucket, ``SWARMBUS_BOARD`` by default; every key starts with the
session id, so ``$KV.<bucket>.<session>.>`` is one session)::

    <session>.session             SessionRecord    start / complete (CAS)
    <session>.context             ContextRecord    set / update (CAS)
    <session>.finding.<id>        FindingRecord    create-once: append-only, idempotent
    <session>.hypothesis.<id>     HypothesisRecord create, then CAS read-modify-write
    <session>.action.<id>         ActionRecord     create, then CAS status transitions

``<id>`` is the item id when it is one ``[A-Za-z0-9_-]`` token, else
``safe_token(id)``; the record keeps the original id. A finding's id is the id of the
envelope that reported it, so a retried or redelivered finding is stored once.

Every write goes to KV first and then publishes its lifecycle event. The board is
the source of truth: an event implies its board write happened, never the reverse
(a process that dies in between leaves the write without its event; appending the
same finding again re-publishes it, de-duplicated by the event id).

Values are msgspec Structs encoded as JSON under the wire-evolution rule: fields are
only added, with defaults, at the end; unknown fields are ignored on decode.

What goes where:

=============  =====================================================================
``records``    stored values (msgspec), ``Snapshot`` and ``BoardChange``, id checks
``store``      ``BoardStore``: the key layout, create-once and compare-and-set on a
               ``NatsStore`` (the ``StateStore`` seam)
``board``      ``Blackboard``: the operations and the events they publish
``watch``      one-pass snapshots and the live tail of a session's changes
``recording``  findings from any NATS client onto the board; retention
=============  =====================================================================
"""

from swarmbus._blackboard.board import Blackboard
from swarmbus._blackboard.recording import RECORDER_AGENT
from swarmbus._blackboard.records import (
    ACTION_INITIAL,
    ACTION_TRANSITIONS,
    ActionRecord,
    BoardChange,
    ConfidenceUpdate,
    ContextRecord,
    FindingRecord,
    HypothesisRecord,
    Json,
    Record,
    SessionRecord,
    Snapshot,
    StatusChange,
    item_token,
    pooled_confidence,
)
from swarmbus._blackboard.store import (
    CAS_ATTEMPTS,
    DEFAULT_BUCKET,
    DEFAULT_HISTORY,
    DEFAULT_MAX_VALUE_BYTES,
    BoardStore,
)

__all__ = [
    "ACTION_INITIAL",
    "ACTION_TRANSITIONS",
    "CAS_ATTEMPTS",
    "DEFAULT_BUCKET",
    "DEFAULT_HISTORY",
    "DEFAULT_MAX_VALUE_BYTES",
    "RECORDER_AGENT",
    "ActionRecord",
    "Blackboard",
    "BoardChange",
    "BoardStore",
    "ConfidenceUpdate",
    "ContextRecord",
    "FindingRecord",
    "HypothesisRecord",
    "Json",
    "Record",
    "SessionRecord",
    "Snapshot",
    "StatusChange",
    "item_token",
    "pooled_confidence",
]
