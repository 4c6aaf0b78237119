"""The runtime behind ``swarmbus up``: coordination services for agents in any language.

What goes where:

================  ==============================================================
``supervisor``    ``Runtime``: starts the server (or connects), runs the services,
                  drains on SIGTERM; ``running`` for tests and embedding
``api``           the request and result Structs of every API operation
``api_server``    ``swarmbus.api.>`` request/reply on the public component APIs
``intake``        incident kind/label -> swarm spec; runs the swarms
``events``        inbound lifecycle events: acted on, or answered with an error
``presence``      heartbeats; who is alive
``holdings``      claims and locks held for agents; released on death
``health``        ``/healthz`` and ``/readyz``
``provision``     streams, buckets and task-queue consumers agents may not create
``asyncapi``      the AsyncAPI 3.0 document of the wire, generated from the code
================  ==============================================================

Import the submodules directly; this package module imports nothing (no cycle through
it, and ``swarmbus --help`` does not load the services).
"""
