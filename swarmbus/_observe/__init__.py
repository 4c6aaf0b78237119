"""Observing a swarm from outside: tail, timeline, dead letters, metrics, a web view.

Modules, one concept each:

- ``_events``: stored and live events of the event stream as ``Step`` s.
- ``_timeline``: a session replayed as a timeline (text, Markdown, JSON).
- ``_tail``: live events for the terminal.
- ``_deadletters``: list and retry dead letters.
- ``_metrics``: OpenTelemetry metrics: configuration and the outside ``Observer``.
- ``_instruments``: in-process ``record_*`` (handler latency, lock waits), used by core.
- ``_pages``, ``_ui``: the web view (Starlette, server-sent events, htmx; ``static/``).
- ``_commands``: the ``swarmbus`` subcommands.

Streams are read through ``swarmbus._jetstream.follow`` (an ordered consumer) and
the public APIs of the blackboard, task queue, consensus and locks; this package
imports no nats-py. Nothing here writes to the swarm except ``retry_dead_letter``.
"""
