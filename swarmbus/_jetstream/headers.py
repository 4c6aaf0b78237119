"""Every NATS / JetStream header and server error code swarmbus reads or writes, once.

As nats.py v3 keeps them in ``headers.py`` and ``ErrorCode``: a name here is the one
place a wire constant is spelled, so two modules can never disagree on it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

# --- NATS / JetStream headers -------------------------------------------------------

MSG_ID: Final = "Nats-Msg-Id"
"""Publish de-duplication id: a retry with the same id is stored once (duplicate window)."""
EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"
"""Compare-and-set: store only if the subject's last sequence is this (0: none)."""
TTL: Final = "Nats-TTL"
"""Per-message TTL in whole seconds (nats-server >= 2.11, ``allow_msg_ttl`` streams)."""
ROLLUP: Final = "Nats-Rollup"
"""``sub``: this message replaces its subject's history; ``all``: the stream's."""
ROLLUP_SUBJECT: Final = "sub"
MARKER_REASON: Final = "Nats-Marker-Reason"
"""Set on the server's delete markers (a key expired by TTL, or removed by a purge)."""
NUM_PENDING: Final = "Nats-Num-Pending"
"""Direct get batches: how many matching messages are left after this batch."""
SEQUENCE: Final = "Nats-Sequence"
"""Direct get replies: the stored message's stream sequence."""
SUBJECT: Final = "Nats-Subject"
"""Direct get replies: the subject the stored message was published on."""
STATUS: Final = "Status"
"""Status of a header-only control message (404 no messages, 408 timeout, 503 ...)."""
DESCRIPTION: Final = "Description"
"""Text of a status message."""
KV_OPERATION: Final = "KV-Operation"
"""KV entries: ``DEL`` or ``PURGE`` for deletes, absent for a value."""
KV_DELETE: Final = "DEL"
KV_PURGE: Final = "PURGE"
KV_REMOVED: Final = frozenset({KV_DELETE, KV_PURGE})

EMPTY_HEADERS: Final = b"NATS/1.0\r\n\r\n"
"""A header block with no header (what a header-only publish without headers sends)."""

# --- swarmbus headers ----------------------------------------------------------------

REASON: Final = "Swarmbus-Reason"
"""Dead letters: why the message was refused, for a person."""
CODE: Final = "Swarmbus-Code"
"""Dead letters: the refusal's code (CONTRACT.md), for a program."""
ORIGINAL_SUBJECT: Final = "Swarmbus-Original-Subject"
"""Dead letters: the subject the refused message was published on."""
TASK_REVISION: Final = "Swarmbus-Task-Revision"
"""Task dispatches: the record revision a claim compares against (0: no record yet)."""

# --- JetStream API ---------------------------------------------------------------------

JS_API: Final = "$JS.API"
KV_SUBJECT_PREFIX: Final = "$KV."


class ErrorCode(IntEnum):
    """JetStream API error codes (``err_code``) that swarmbus acts on."""

    NO_SUITABLE_PEERS = 10005
    """A stream's peers are offline (a node just started or is restarting): transient."""
    STREAM_IN_USE = 10058
    """The stream name is in use with another configuration."""
    WRONG_LAST_SEQUENCE = 10071
    """A compare-and-set lost: the subject's last sequence was not the expected one."""
    WRONG_LAST_SEQUENCE_CONSTANT = 10164
    """A compare-and-set lost (the server's other wording of the same refusal)."""


WRONG_LAST_SEQUENCE: Final = frozenset(
    {ErrorCode.WRONG_LAST_SEQUENCE, ErrorCode.WRONG_LAST_SEQUENCE_CONSTANT}
)
"""Every err_code that means "a compare-and-set lost to another writer"."""
