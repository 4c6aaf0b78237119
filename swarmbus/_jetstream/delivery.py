"""What a receive loop touches of nats-py: messages, subscriptions, durable pull consumers.

The bus's receive loops (``swarmbus._consumer``, ``swarmbus._request_server``) handle
nats-py messages on the hot path: an ack, a nak, a reply is one call each, so they get
the nats-py types and the one exception class those calls raise from here, by name,
instead of a wrapper that would cost an await per message. Creating and binding a
durable pull consumer, with its JetStream refusals translated, is here too.
"""

from __future__ import annotations

from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as Connection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from swarmbus._jetstream.errors import translate
from swarmbus._jetstream.headers import JS_API
from swarmbus._jetstream.retry import Guard

__all__ = [
    "FETCH_TIMEOUT",
    "Connection",
    "Msg",
    "PullSubscription",
    "Subscription",
    "TransportError",
    "durable_pull",
]

#: What a message operation (ack, nak, in_progress, a reply, a fetch) raises when the
#: connection fails it.
TransportError: Final = nats.errors.Error
#: What an expired fetch raises (nothing was waiting).
FETCH_TIMEOUT: Final = (TimeoutError, nats.errors.TimeoutError)

PullSubscription = JetStreamContext.PullSubscription


async def durable_pull(
    js: JetStreamContext,
    stream: str,
    durable: str,
    filter_subjects: list[str],
    *,
    ack_wait: float,
    max_deliver: int,
    deliver_new: bool,
    guard: Guard,
) -> PullSubscription:
    """Create (or update) the durable consumer ``durable`` on ``stream`` and bind to it.

    Raises:
        PermissionDeniedError, PublishError: the server refused the consumer.
    """
    config = ConsumerConfig(
        durable_name=durable,
        filter_subjects=filter_subjects,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=1000,
        deliver_policy=DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL,
    )
    try:
        with guard(
            f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}", f"create consumer {durable}"
        ):
            await js.add_consumer(stream, config)
        return await js.pull_subscribe_bind(durable, stream)
    except nats.js.errors.APIError as exc:
        raise translate(exc, f"cannot create consumer {durable}") from exc
