// A second, independent MCP client: the TypeScript SDK over stdio, driven line by line.
//
// Usage: node client.mjs <server command> [args...]   (the server's env is inherited)
// stdin: one JSON request per line, {"id": 1, "tool": "swarm_join_session", "arguments": {...}}
//        or {"id": 2, "op": "list_tools"}; stdout: one JSON reply per line, in order,
//        {"id": 1, "is_error": false, "structured": {...}, "text": "..."} or {"id": 1, "failure": "..."}.
// The SDK checks every structured result against the tool's output schema.
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const [command, ...args] = process.argv.slice(2);
const transport = new StdioClientTransport({ command, args, env: process.env, stderr: "inherit" });
const client = new Client({ name: "swarmbus-test-node-client", version: "0.0.0" });
await client.connect(transport);

const reply = (message) => process.stdout.write(JSON.stringify(message) + "\n");

async function handle(request) {
  if (request.op === "list_tools") {
    const { tools } = await client.listTools();
    return { id: request.id, tools };
  }
  const result = await client.callTool(
    { name: request.tool, arguments: request.arguments ?? {} },
    undefined,
    { timeout: 60000 },
  );
  const text = (result.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join(" ");
  return { id: request.id, is_error: Boolean(result.isError), structured: result.structuredContent ?? null, text };
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const request = JSON.parse(line);
  try {
    reply(await handle(request));
  } catch (error) {
    reply({ id: request.id, failure: String(error?.message ?? error) });
  }
}
await client.close();
