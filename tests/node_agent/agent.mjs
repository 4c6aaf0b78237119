// A swarmbus investigator in Node.js: NATS and JSON only (CONTRACT.md v1.1).
//
//   node agent.mjs NATS_URL SESSION AGENT_ID
//
// Joins the session and heartbeats; claims its `investigate` subtask through the
// runtime API, posts a finding, completes the task with it; watches the event stream
// (JetStream) for a proposal it may vote on, votes yes; exits after the decision
// event. Every message it receives is printed as one JSON line {"kind", "subject",
// "data"} so the test can validate it against schemas/.
import { connect } from "@nats-io/transport-node";
import { jetstream, DeliverPolicy } from "@nats-io/jetstream";

const [url, session, agent] = process.argv.slice(2);
const nc = await connect({ servers: url });
const show = (kind, subject, data) => console.log(JSON.stringify({ kind, subject, data }));

async function call(op, body) {
  const subject = `swarmbus.api.${op}.${session}.${agent}`;
  const reply = (await nc.request(subject, JSON.stringify(body), { timeout: 30000 })).json();
  show("reply", subject, reply);
  if (!reply.ok) throw new Error(`${op}: ${reply.error.code}: ${reply.error.reason}`);
  return reply.result;
}

const joined = await call("session.join", {});
const heartbeat = setInterval(
  () => nc.publish(`swarmbus.api.presence.heartbeat.${session}.${agent}`, "{}"),
  joined.heartbeat_interval * 1000,
);

// The decision may come while we work: subscribe first.
const decisions = nc.subscribe(`agent.action.decided.${session}.>`);

let claimed = { task: null };
while (claimed.task === null) {
  claimed = await call("task.claim", { capability: "investigate", wait: 5 });
}
const task = claimed.task;
await call("task.heartbeat", { task_id: task.id });
const finding = {
  category: "hypothesis",
  content: "error rate spike correlates with deploy v1.2.3",
  confidence: 0.8,
  evidence: [{ source: "prometheus", query: "rate(errors[5m])", result: "0.05" }],
};
await call("finding.post", finding);
await call("task.complete", { task_id: task.id, result: { findings: [finding] } });

// Vote on the first proposal that names us, read from the event stream.
const js = jetstream(nc);
const consumer = await js.consumers.get("SWARMBUS_EVENTS", {
  filter_subjects: [`agent.action.proposed.${session}.>`],
  deliver_policy: DeliverPolicy.All,
});
const proposals = await consumer.consume();
for await (const m of proposals) {
  const envelope = m.json();
  show("event", m.subject, envelope);
  if (envelope.type === "proposal" && envelope.proposal.voters.includes(agent)) {
    await call("vote.cast", {
      vote: {
        proposal_id: envelope.proposal.proposal_id,
        vote: "yes",
        confidence: 0.9,
        reason: "Error rate 5x baseline",
      },
    });
    break;
  }
}
for await (const m of decisions) {
  show("event", m.subject, m.json());
  break;
}
clearInterval(heartbeat);
await call("session.leave", {});
await nc.drain();
