"""HTML of the web view: server-rendered pages and the fragments htmx swaps in.

Plain functions over ``html.escape``: every value from the swarm is escaped here.
Accessibility: landmarks (header, nav, main), one h1 per page, tables with captions
and header scopes, live regions for what changes, and every status spelled out in
text (colour only repeats it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from html import escape
from urllib.parse import quote

from swarmbus._blackboard import SessionRecord, Snapshot
from swarmbus._locks import Holder
from swarmbus._observe._deadletters import DeadLetter
from swarmbus._observe._events import Step
from swarmbus._observe._timeline import Timeline, task_label
from swarmbus._tasks import Task


def e(value: object) -> str:
    return escape(str(value), quote=True)


def page(title: str, body: str, *, crumbs: Sequence[tuple[str, str]] = ()) -> str:
    """A whole page: skip link, header with navigation, main."""
    trail = "".join(f'<li><a href="{e(href)}">{e(text)}</a></li>' for href, text in crumbs)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · swarmbus</title>
<link rel="stylesheet" href="/static/style.css">
<script src="/static/htmx.min.js" defer></script>
<script src="/static/live.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header>
<p class="brand"><a href="/">swarmbus</a></p>
<nav aria-label="Main"><ul>
<li><a href="/">Sessions</a></li><li><a href="/dead">Dead letters</a></li>
</ul></nav>
</header>
<nav aria-label="Breadcrumb" class="crumbs"><ol>{trail}</ol></nav>
<main id="main">
<h1>{e(title)}</h1>
{body}
</main>
</body>
</html>
"""


def table(caption: str, header: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """A table whose cells are already HTML; ``empty`` when there are no rows."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{e(empty)}</p>'
    head = "".join(f'<th scope="col">{e(h)}</th>' for h in header)
    return (
        f"<table><caption>{e(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def session_href(session: str) -> str:
    return f"/sessions/{quote(session)}"


def sessions_page(sessions: Sequence[SessionRecord]) -> str:
    rows = [
        [
            f'<a href="{session_href(s.session_id)}">{e(s.session_id)}</a>',
            e(s.status),
            e(s.initiator),
            f'<time datetime="{e(s.started.isoformat())}">'
            f"{e(s.started.strftime('%Y-%m-%d %H:%M:%S'))}</time>",
            e(json.dumps(s.outcome, sort_keys=True)) if s.outcome else "",
        ]
        for s in reversed(sessions)
    ]
    body = table(
        "Sessions on the blackboard, newest first",
        ["Session", "Status", "Initiator", "Started (UTC)", "Outcome"],
        rows,
        "No sessions yet.",
    )
    return page("Sessions", body)


def session_page(session: str, trace_url: str | None) -> str:
    base = session_href(session)
    panels = "".join(
        f"""<section aria-labelledby="{name}-h" class="panel">
<h2 id="{name}-h">{title}</h2>
<div id="{name}" hx-get="{base}/{name}" hx-trigger="load, swarm-changed from:body"
 hx-sync="this:queue last"
 aria-live="polite" aria-busy="false"><p>Loading…</p></div>
</section>"""
        for name, title in (
            ("board", "Board"),
            ("proposals", "Proposals and votes"),
            ("tasks", "Tasks"),
            ("locks", "Locks"),
        )
    )
    body = f"""<div class="layout">
<section aria-labelledby="timeline-h" class="timeline-panel">
<h2 id="timeline-h">Timeline</h2>
<p id="timeline-status" role="status">Connecting to the live event stream…</p>
<ol id="timeline" class="timeline" data-stream="{base}/events" aria-live="polite"
 aria-relevant="additions"></ol>
</section>
<div class="panels">{panels}</div>
</div>"""
    return page(f"Session {session}", body, crumbs=[("/", "Sessions"), (base, session)])


def trace_href(trace_url: str, trace_id: str) -> str:
    """``trace_url`` with its ``{trace_id}`` filled in. Not ``str.format``: a tracing
    backend's URL may hold other braces (Grafana's ``explore?left={"queries":...}``)."""
    return trace_url.replace("{trace_id}", quote(trace_id, safe=""))


def trace_link(session: str, step: Step, trace_url: str | None) -> str:
    if not step.trace_id:
        return ""
    href = (
        trace_href(trace_url, step.trace_id)
        if trace_url
        else f"{session_href(session)}/trace/{step.trace_id}"
    )
    return (
        f' <a class="trace" href="{e(href)}" aria-label="trace {e(step.trace_id)}">'
        f"trace {e(step.trace_id[:8])}</a>"
    )


def step_item(timeline: Timeline, step: Step, line: str, trace_url: str | None) -> str:
    """One timeline entry (an ``<li>``)."""
    offset = timeline.offset(step)
    kind = step.type.replace(".", "-")
    return (
        f'<li class="step t-{e(kind)}" data-type="{e(step.type)}" data-seq="{step.seq}">'
        f'<time datetime="{e(step.time.isoformat())}">+{offset:.3f}s</time> '
        f'<span class="agent">{e(step.agent)}</span> '
        f'<span class="kind">[{e(step.type)}]</span> '
        f'<span class="what">{e(line)}</span>{trace_link(timeline.session, step, trace_url)}</li>'
    )


def board_fragment(snapshot: Snapshot) -> str:
    findings = table(
        "Findings",
        ["Agent", "Category", "Confidence", "Finding"],
        [
            [e(f.agent), e(f.category), f"{f.confidence:.2f}", e(f.content)]
            for f in snapshot.findings
        ],
        "No findings yet.",
    )
    hypotheses = table(
        "Hypotheses, by pooled confidence",
        ["Hypothesis", "Pooled confidence", "Status"],
        [
            [e(h.description), f"{h.confidence:.2f}", e(h.status)]
            for h in sorted(snapshot.hypotheses, key=lambda h: -h.confidence)
        ],
        "No hypotheses yet.",
    )
    actions = table(
        "Actions",
        ["Agent", "Action", "Target", "Status"],
        [[e(a.agent), e(a.action), e(a.target), e(a.status)] for a in snapshot.actions_taken],
        "No actions yet.",
    )
    status = e(snapshot.session.status) if snapshot.session else "unknown"
    return f"<p>Session status: <strong>{status}</strong></p>{findings}{hypotheses}{actions}"


def proposals_fragment(timeline: Timeline) -> str:
    if not timeline.proposals:
        return '<p class="empty">No proposals yet.</p>'
    out = []
    for p in timeline.proposals.values():
        votes = table(
            f"Votes on {p.id}",
            ["Voter", "Vote", "Confidence", "Reason"],
            [
                [
                    e(v["voter"]),
                    e(v["vote"]),
                    f"{v['confidence']:.2f}" if v["confidence"] is not None else "-",
                    e(v["reason"]),
                ]
                for v in p.votes
            ],
            "No votes yet.",
        )
        d = p.decision
        verdict = (
            f'<p class="decision" data-outcome="{e(d["outcome"])}"><strong>Decision: '
            f"{e(d['decision'])}</strong> ({e(d['outcome'])}; for {d['votes_for']}, against "
            f"{d['votes_against']}, abstentions {d['abstentions']})</p>"
            if d
            else '<p class="decision">Open: no decision yet.</p>'
        )
        out.append(
            f"<article><h3>{e(p.action)} of {e(p.target)} <small>({e(p.id)})</small></h3>"
            f"<p>Proposed by {e(p.proposer)}; rule {e(p.rule)}.</p>{votes}{verdict}</article>"
        )
    return "".join(out)


def tasks_fragment(tasks: Sequence[Task]) -> str:
    rows = []
    for t in tasks:
        took = (
            f"{(t.completed_at - t.created_at).total_seconds():.3f}s"
            if t.completed_at and t.created_at
            else "-"
        )
        note = "dead" if t.dead else (t.error or "")
        label = task_label(t.type, t.parameters.target)
        rows.append(
            [e(label), e(t.status), e(t.assigned_to or "-"), str(t.attempts), took, e(note)]
        )
    header = ["Task", "Status", "Assigned to", "Attempts", "Took", "Note"]
    return table("Tasks of this session, oldest first", header, rows, "No tasks.")


def locks_fragment(holders: Sequence[Holder]) -> str:
    rows = [
        [e(h.resource), e(h.owner), str(h.token), e(h.expires_at.strftime("%H:%M:%S"))]
        for h in holders
    ]
    return table(
        "Locks held now (all sessions)",
        ["Resource", "Owner", "Fencing token", "Expires (UTC)"],
        rows,
        "No locks held.",
    )


def trace_page(session: str, trace_id: str, items: Sequence[str], trace_url: str | None) -> str:
    external = (
        f'<p><a href="{e(trace_href(trace_url, trace_id))}">Open in the tracing backend</a></p>'
        if trace_url
        else ""
    )
    body = f'{external}<ol class="timeline">{"".join(items)}</ol>' if items else "<p>No steps.</p>"
    return page(
        f"Trace {trace_id}",
        body,
        crumbs=[("/", "Sessions"), (session_href(session), session), ("", f"trace {trace_id[:8]}")],
    )


def dead_page(letters: Sequence[DeadLetter], *, can_retry: bool, notice: str = "") -> str:
    rows = []
    for d in letters:
        action = (
            f'<form method="post" action="/dead/{d.id}/retry">'
            f'<label for="token-{d.id}">Token</label> '
            f'<input id="token-{d.id}" name="token" type="password" autocomplete="off" required> '
            f'<button type="submit">Retry {d.id}</button></form>'
            if can_retry
            else "read-only"
        )
        rows.append(
            [
                str(d.id),
                f'<a href="{session_href(d.session)}">{e(d.session)}</a>',
                e(d.receiver),
                e(d.code),
                e(d.reason),
                f"<code>{e(d.original_subject)}</code>",
                f"<code>{e(d.data[:200].decode(errors='replace'))}</code>",
                action,
            ]
        )
    intro = (
        "<p>Retrying republishes the original bytes on the original subject.</p>"
        if can_retry
        else "<p>Read-only: start the view with a token (SWARMBUS_UI_TOKEN) to allow retries.</p>"
    )
    status = f'<p role="status" class="notice">{e(notice)}</p>' if notice else ""
    body = (
        status
        + intro
        + table(
            "Dead letters, oldest first",
            ["ID", "Session", "Receiver", "Code", "Reason", "Original subject", "Data", "Retry"],
            rows,
            "No dead letters.",
        )
    )
    return page("Dead letters", body, crumbs=[("/", "Sessions"), ("/dead", "Dead letters")])
