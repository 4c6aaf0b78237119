"""Observing a swarm from outside: tail, timeline, dead letters, metrics, a web view.

Modules, one concept each:

- ``_events``: stored and live events of the event stream as ``Step`` s.
- ``_timeline``: a session replayed as a timeline (text, Markdown, JSON).
- ``_tail``: live events for the terminal.
- ``_deadletters``: list and retry dead letters.
- ``_metrics``: OpenTelemetry metrics: an outside observer plus in-process ``record_*``.
- ``_ui``: the web view (Starlette, server-sent events, htmx).

Everything reads through the bus (``Bus.js``) and the public APIs of the blackboard,
task queue, consensus and locks; nothing here writes to the swarm except
``retry_dead_letter``.
"""
