"""Rule-based incident agents for ``swarmbus run`` (no LLM, no network).

    swarmbus run examples/parallel_investigation.yaml --agents examples/incident_agents.py

A module for ``--agents`` defines ``agents()`` returning ``swarmbus.Agent`` objects.
Agents take part in swarms through capability handlers: ``investigate`` (parallel
investigation), ``synthesize`` (the synthesis agent) and ``refine`` (a stage of a
progressive refinement). Evidence comes from a canned incident (``SYSTEMS``); each
query goes through ``swarmbus.QueryLedger``, so with ``avoid_duplicate_queries`` two
agents never run the same query twice in one session.
"""

from __future__ import annotations

from typing import Any, Literal

import swarmbus
from swarmbus import Agent, Evidence, Finding, RequestMessage

#: What the incident's systems answer, by (source, query).
SYSTEMS: dict[tuple[str, str], str] = {
    ("deploy-log", "deployments --service checkout --since 1h"): "v1.2.3 at 10:15 UTC",
    ("prometheus", "rate(errors[5m])"): "0.05 (baseline 0.01)",
    ("loki", '{app="checkout"} |= "error"'): "312x 'connection pool exhausted' since 10:16",
    ("argo", "history checkout"): "v1.2.2 healthy for 14 days; rollback tested",
}


async def _evidence(request: RequestMessage, agent: Agent, source: str, query: str) -> Evidence:
    """Run one evidence query, once per session when the swarm asks for it."""
    ledger = await swarmbus.QueryLedger.open(
        agent.bus,
        request.source.session,
        agent=agent.id,
        enabled=bool(request.request.parameters.get("avoid_duplicate_queries", True)),
    )

    async def execute() -> str:
        return SYSTEMS[(source, query)]

    return (await ledger.run(source, query, execute)).evidence


def _finding(
    category: Literal["observation", "hypothesis"],
    content: str,
    confidence: float,
    *evidence: Evidence,
) -> Finding:
    return Finding(
        category=category, content=content, confidence=confidence, evidence=list(evidence)
    )


def agents() -> list[Agent]:
    """Fresh agents (each run serves its own objects)."""
    validator = Agent("ops/deploy-validator", expertise={"observation": 0.9, "hypothesis": 0.8})
    lead = Agent(
        "security/incident-response-lead", expertise={"observation": 0.8, "hypothesis": 0.6}
    )
    advisor = Agent("ops/rollback-advisor", expertise={"observation": 0.7, "hypothesis": 0.7})
    architect = Agent("ops/architect", expertise={"conclusion": 0.9})

    @validator.on_request("investigate")
    async def validator_investigates(request: RequestMessage) -> dict[str, Any]:
        deploys = await _evidence(
            request, validator, "deploy-log", "deployments --service checkout --since 1h"
        )
        errors = await _evidence(request, validator, "prometheus", "rate(errors[5m])")
        return {
            "findings": [
                _finding("observation", "deployment v1.2.3 at 10:15 UTC", 0.95, deploys),
                _finding(
                    "hypothesis", "deployment v1.2.3 caused the error spike", 0.8, deploys, errors
                ),
            ]
        }

    @lead.on_request("investigate")
    async def lead_investigates(request: RequestMessage) -> dict[str, Any]:
        errors = await _evidence(request, lead, "prometheus", "rate(errors[5m])")
        logs = await _evidence(request, lead, "loki", '{app="checkout"} |= "error"')
        return {
            "findings": [
                _finding("observation", "error rate spike correlates with deploy", 0.85, errors),
                _finding("hypothesis", "database connection pool exhaustion", 0.7, logs),
            ]
        }

    @advisor.on_request("investigate")
    async def advisor_investigates(request: RequestMessage) -> dict[str, Any]:
        deploys = await _evidence(
            request, advisor, "deploy-log", "deployments --service checkout --since 1h"
        )
        history = await _evidence(request, advisor, "argo", "history checkout")
        return {
            "findings": [
                _finding("observation", "v1.2.2 is a safe rollback target", 0.9, history),
                _finding("hypothesis", "deployment v1.2.3 caused the error spike", 0.85, deploys),
                _finding("hypothesis", "memory leak in new feature", 0.3),
            ]
        }

    @architect.on_request("synthesize")
    async def architect_synthesizes(request: RequestMessage) -> dict[str, Any]:
        hypotheses = request.request.parameters.get("hypotheses", [])
        best = max(hypotheses, key=lambda h: h["confidence"], default=None)
        if best and "deployment" in best["description"] and best["confidence"] >= 0.6:
            return {
                "decision": "rollback",
                "target": "checkout",
                "version": "v1.2.3",
                "reason": f"{best['description']} (confidence {best['confidence']:.2f})",
            }
        return {"decision": "keep investigating", "reason": "no hypothesis is strong enough"}

    @validator.on_request("refine")
    async def validator_refines(request: RequestMessage) -> dict[str, Any]:
        deploys = await _evidence(
            request, validator, "deploy-log", "deployments --service checkout --since 1h"
        )
        return {"changes_list": [{"service": "checkout", "change": deploys.result}]}

    @lead.on_request("refine")
    async def lead_refines(request: RequestMessage) -> dict[str, Any]:
        changes = request.request.parameters["inputs"]["changes_list"]
        errors = await _evidence(request, lead, "prometheus", "rate(errors[5m])")
        return {
            "correlation_report": {
                "suspect": changes[0]["change"],
                "error_rate": errors.result,
                "correlated": True,
            }
        }

    @advisor.on_request("refine")
    async def advisor_refines(request: RequestMessage) -> dict[str, Any]:
        report = request.request.parameters["inputs"]["correlation_report"]
        action = "rollback" if report["correlated"] else "monitor"
        return {"recommendation": {"action": action, "from": report["suspect"], "to": "v1.2.2"}}

    return [validator, lead, advisor, architect]
