// Emits CloudEvents made by the official JavaScript SDK (npm `cloudevents`, pinned in
// package.json) to a Tidings broker, driven by tests/cloudevents.rs.
//
// Usage: node emit.mjs URL PLAN.json [AUTHORIZATION]
// The plan is a JSON array of requests, each {"mode": "binary"|"structured"|"batch",
// "events": [attributes, …]} (binary and structured take one event). The SDK builds and
// validates each CloudEvent and serializes it for its mode (HTTP.binary / HTTP.structured);
// the SDK has no batch serializer, so a batch is the JSON array of the SDK's events with the
// batched media type the SDK's own parser recognises (CONSTANTS.MIME_CE_BATCH). Every answer
// is printed as one JSON line: {"status": N, "body": …}.
import { readFileSync } from "node:fs";
import { CloudEvent, HTTP, CONSTANTS } from "cloudevents";

const [url, planFile, authorization] = process.argv.slice(2);
if (!url || !planFile) {
  console.error("usage: node emit.mjs URL PLAN.json [AUTHORIZATION]");
  process.exit(2);
}
const plan = JSON.parse(readFileSync(planFile, "utf8"));

function message(step) {
  const events = step.events.map((attributes) => new CloudEvent(attributes));
  switch (step.mode) {
    case "binary":
      return HTTP.binary(events[0]);
    case "structured":
      return HTTP.structured(events[0]);
    case "batch":
      return {
        headers: { [CONSTANTS.HEADER_CONTENT_TYPE]: `${CONSTANTS.MIME_CE_BATCH}; charset=utf-8` },
        body: JSON.stringify(events),
      };
    default:
      throw new Error(`unknown mode ${step.mode}`);
  }
}

for (const step of plan) {
  const { headers, body } = message(step);
  if (authorization) headers.authorization = authorization;
  const response = await fetch(url, { method: "POST", headers, body });
  const text = await response.text();
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  console.log(JSON.stringify({ status: response.status, body: parsed, sent: headers }));
}
