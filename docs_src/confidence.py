"""Confidence aggregation: pool several agents' confidence in one claim (pure, no I/O)."""

from swarmbus import Agent, Opinion, aggregate_confidence

dba = Agent("ops/dba", expertise={"database": 0.9})
sre = Agent("ops/sre", expertise={"database": 0.6})
agents = [dba, sre]

opinions = [
    Opinion(agent="ops/dba", confidence=0.9, evidence=3, category="database"),
    Opinion(agent="ops/sre", confidence=0.6, evidence=1, category="database"),
]
expertise = {a.id: a.expertise for a in agents}
# weight = expertise(agent, category) x (0.5 + 0.1 x evidence count)
print("weighted_average", round(aggregate_confidence(opinions, expertise), 3))
print(
    "log_odds",
    round(aggregate_confidence(opinions, expertise, method="log_odds", category="database"), 3),
)
