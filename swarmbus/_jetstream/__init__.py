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
``workqueue``             the task queue's work-queue stream, consumers and puller
========================  ==========================================================

Import the submodules directly; this package module imports nothing, so that the
constants in ``headers`` are importable from anywhere without a cycle.
"""
