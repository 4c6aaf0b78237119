"""Every YAML and JSON example of the seed, copied verbatim into tests/fixtures/seed/,
loads or gives the error that docs/use/seed-examples.md documents for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import swarmbus
from swarmbus._consensus_spec import parse_consensus
from swarmbus._mcp import ServerConfig
from swarmbus._yaml import load_yaml

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "tests/fixtures/seed"
SCHEMAS = ROOT / "schemas"


def test_every_seed_example_is_documented() -> None:
    page = (ROOT / "docs/use/seed-examples.md").read_text()
    for path in SEED.iterdir():
        assert f"`{path.name}`" in page, path.name


@pytest.mark.parametrize("name", ["parallel_investigation.yaml", "progressive_refinement.yaml"])
def test_the_seed_swarms_load(name: str) -> None:
    spec = swarmbus.load_spec(SEED / name)
    assert spec.type == name.removesuffix(".yaml")


def test_the_seed_consensus_block_names_the_one_line_to_fix() -> None:
    """The seed writes ``quorum: majority | unanimous | threshold`` (the choices)."""
    with pytest.raises(swarmbus.SpecError) as info:
        swarmbus.load_consensus(SEED / "consensus.yaml")
    assert info.value.problems == [
        (
            "consensus.quorum",
            "pick one of majority, unanimous, threshold (the seed's line lists the choices)",
        )
    ]


@pytest.mark.parametrize("loader", [load_yaml, yaml.safe_load])
def test_the_seed_consensus_block_with_a_quorum_picked_loads(loader: object) -> None:
    """Votes stay words (``yes``), even from PyYAML's YAML 1.1 loader; ``5m`` is 300 s."""
    text = (SEED / "consensus.yaml").read_text()
    text = text.replace("quorum: majority | unanimous | threshold", "quorum: majority")
    assert callable(loader)
    spec = parse_consensus(loader(text))
    assert spec.timeout == 300.0
    assert [v.vote for v in spec.votes] == ["yes", "yes", "abstain"]
    proposal = spec.to_proposal("P-1")
    assert (proposal.action, proposal.parameters, proposal.timeout) == (
        "rollback",
        {"version": "v1.2.3"},
        300.0,
    )
    assert spec.result is not None
    assert spec.result.votes_for == 2
    voters = [agent for agent, _ in spec.to_votes("P-1")]
    assert voters == [
        "ops/deploy-validator",
        "ops/rollback-advisor",
        "security/incident-response-lead",
    ]


def test_a_result_that_disagrees_with_its_votes_is_refused() -> None:
    text = (SEED / "consensus.yaml").read_text()
    text = text.replace("quorum: majority | unanimous | threshold", "quorum: majority")
    text = text.replace("votes_for: 2", "votes_for: 3")
    with pytest.raises(swarmbus.SpecError, match="disagree with the votes"):
        parse_consensus(load_yaml(text))


def test_load_yaml_keeps_yes_and_no_as_words() -> None:
    assert load_yaml("a: yes\nb: no\nc: on\nd: true\ne: false") == {
        "a": "yes",
        "b": "no",
        "c": "on",
        "d": True,
        "e": False,
    }


@pytest.mark.parametrize("name", ["message.yaml", "task_queue.yaml"])
def test_the_seed_templates_are_not_yaml(name: str) -> None:
    """``type: "finding" | "action"`` lists choices: a template, not a document."""
    with pytest.raises(yaml.YAMLError):
        load_yaml((SEED / name).read_text())


def test_a_filled_in_seed_message_says_to_unwrap_it() -> None:
    """The seed's message with one choice made, still wrapped in ``message:``."""
    text = (SEED / "message.yaml").read_text()
    filled = {
        "message": {
            "id": "0b6f6d3e-1d2a-4c55-9f1e-2f8c1d7a9b10",
            "timestamp": "2025-01-02T10:30:00Z",
            "source": {"agent": "ops/release-manager", "session": "INC-1234"},
            "type": "finding",
            "finding": {"category": "observation", "content": "x", "confidence": 0.5},
        }
    }
    assert "message:" in text
    with pytest.raises(swarmbus.InvalidMessageError, match="send the object inside it"):
        swarmbus.decode(json.dumps(filled).encode())
    swarmbus.decode(json.dumps(filled["message"]).encode())


def test_the_seed_event_types_are_envelope_types_with_the_seed_fields() -> None:
    events = load_yaml((SEED / "event_types.yaml").read_text())["events"]
    for event, fields in events.items():
        schema = json.loads((SCHEMAS / f"{event}.schema.json").read_text())
        body = next(
            d for n, d in schema["$defs"].items() if not n.endswith("Message") and n != "Source"
        )
        assert set(fields) <= set(body["properties"]), event


def test_the_seed_coordination_block_is_yaml_but_not_a_swarmbus_setting() -> None:
    data = load_yaml((SEED / "coordination_redis.yaml").read_text())
    assert data["coordination"]["backend"] == "redis"
    with pytest.raises(swarmbus.SpecError):
        swarmbus._spec.parse_spec(data)


def test_the_seed_mcp_config_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    server = json.loads((SEED / "mcp_servers.json").read_text())["mcpServers"]["agent-swarm"]
    assert server["command"] == "mcp-agent-swarm"
    values = {"${REDIS_URL}": "redis://127.0.0.1:6379/0", "${AGENT_ID}": "ops/claude"}
    monkeypatch.delenv("NATS_URL", raising=False)
    for key, value in server["env"].items():
        monkeypatch.setenv(key, values.get(value, value))  # what the MCP client expands
    config = ServerConfig.from_env()
    assert (config.agent_id, config.settings.backend) == ("ops/claude", "redis")
    assert config.settings.redis_url == "redis://127.0.0.1:6379/0"
    assert config.settings.servers == []  # no NATS_URL: the server embeds its own
