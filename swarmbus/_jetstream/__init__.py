"""The JetStream layer: the one place swarmbus speaks NATS beyond publish/subscribe.

What goes where:

========================  ==========================================================
``headers``               every header name and server error code, once
``errors``                nats-py exceptions -> the ``SwarmbusError`` tree; transient?
``retry``                 a JetStream context that survives leader elections; the
                          lost-ack check (``stored_already``)
``acks``                  acknowledged writes: pipelined publishes, compare-and-set
``kv``                    KV put / create-once / compare-and-set, trace context
``reads``                 stored messages, last per subject, KV state, pulls
``store``                 ``NatsStore``: the ``StateStore`` seam on a KV bucket
``workqueue``             the task queue's work-queue stream, consumers and puller;
                          the service's queue-consumer provisioner
``streams``               stream and KV bucket provisioning (buckets refuse rollups)
``delivery``              durable pull consumers: create and bind
``outbox``                confirmed background publishes, re-sent until stored
``watch``                 ``KvWatch`` (one watch of a bucket), ``watch_until``
``latest``                a key's last entry (markers included), bucket entries, scans
``purge``                 purging keys
``follow``                reading a stream in order (tail, timeline), dead letters,
                          stream and consumer state for metrics
``replies``               core request/reply on raw bytes (the runtime's API)
``hotpath``               the request and task hot paths: messages taken in the read
                          loop (``InlineDelivery``), ``publish_nowait``, ``flush_now``,
                          ``settled`` (acks awaited)
========================  ==========================================================

Import the submodules directly; this package module imports nothing, so that the
constants in ``headers`` are importable from anywhere without a cycle.
"""
