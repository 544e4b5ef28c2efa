// Validates custom resources (KEDA, Strimzi, Prometheus Operator) against their CRDs' schemas,
// offline: the schemas come compiled (as JSON Schema validators) in the npm packages of
// kubernetes-models, pinned in package.json.
//
//   node crd-validate.mjs OBJECTS.json      # [{"source": "...", "object": {...}}, ...]
//
// Prints one line per problem and exits 1 if there is any. Two kinds of problem:
//   * the schema's own errors (types, enums, required fields, bounds);
//   * fields the schema does not know. The compiled validators accept unknown properties (the API
//     server would prune or, with strict field validation, reject them), so each object is
//     wrapped in a Proxy that records which properties the validator reads: a validator reads
//     every property its schema declares, and enumerates the keys of a map. A key that the
//     validator neither read nor could have enumerated is not in the schema. Objects whose
//     validator read no property at all are free-form (x-kubernetes-preserve-unknown-fields,
//     such as Kafka's `config`) and are not judged.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(import.meta.url);
const pkgDir = (name) => dirname(require.resolve(`${name}/package.json`));

const KEDA = "@kubernetes-models/keda";
const PROM = "@kubernetes-models/prometheus-operator";
const STRIMZI = "@kubernetes-models/strimzi-kafka-operator";
const PROM_PREFIX = "ComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoring";

/** apiVersion/kind -> [package, schema module]. Anything else is refused (not silently passed). */
const SCHEMAS = {
  "keda.sh/v1alpha1/ScaledObject": [KEDA, "ComGithubKedacoreKedaV2ApisKedaV1alpha1ScaledObject"],
  "keda.sh/v1alpha1/TriggerAuthentication": [KEDA, "ComGithubKedacoreKedaV2ApisKedaV1alpha1TriggerAuthentication"],
  "monitoring.coreos.com/v1/PodMonitor": [PROM, `${PROM_PREFIX}V1PodMonitor`],
  "monitoring.coreos.com/v1/ServiceMonitor": [PROM, `${PROM_PREFIX}V1ServiceMonitor`],
  "monitoring.coreos.com/v1/PrometheusRule": [PROM, `${PROM_PREFIX}V1PrometheusRule`],
  "monitoring.coreos.com/v1alpha1/ScrapeConfig": [PROM, `${PROM_PREFIX}V1alpha1ScrapeConfig`],
  "kafka.strimzi.io/v1/Kafka": [STRIMZI, "KafkaStrimziIoV1Kafka"],
  "kafka.strimzi.io/v1/KafkaNodePool": [STRIMZI, "KafkaStrimziIoV1KafkaNodePool"],
  "kafka.strimzi.io/v1/KafkaTopic": [STRIMZI, "KafkaStrimziIoV1KafkaTopic"],
  "kafka.strimzi.io/v1/KafkaUser": [STRIMZI, "KafkaStrimziIoV1KafkaUser"],
};

async function validatorFor(apiVersion, kind) {
  const entry = SCHEMAS[`${apiVersion}/${kind}`];
  if (!entry) return null;
  const [pkg, module] = entry;
  const file = join(pkgDir(pkg), "_schemas", `${module}.js`);
  return (await import(pathToFileURL(file).href)).validate;
}

/** Wraps `value` (recursively) in Proxies that record property reads per JSON pointer. */
function track(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  const record = { value, read: new Set(), enumerated: false };
  seen.set(path, record);
  const copy = Array.isArray(value)
    ? value.map((v, i) => track(v, `${path}/${i}`, seen))
    : Object.fromEntries(Object.entries(value).map(([k, v]) => [k, track(v, `${path}/${k}`, seen)]));
  return new Proxy(copy, {
    get(target, prop, receiver) {
      if (typeof prop === "string") record.read.add(prop);
      return Reflect.get(target, prop, receiver);
    },
    has(target, prop) {
      if (typeof prop === "string") record.read.add(prop);
      return Reflect.has(target, prop);
    },
    ownKeys(target) {
      record.enumerated = true;
      return Reflect.ownKeys(target);
    },
  });
}

function unknownFields(seen) {
  const unknown = [];
  for (const [path, { value, read, enumerated }] of seen) {
    if (Array.isArray(value) || enumerated || read.size === 0) continue;
    for (const key of Object.keys(value)) {
      if (!read.has(key)) unknown.push(`${path}/${key}`);
    }
  }
  return unknown;
}

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
let problems = 0;
const counts = {};
for (const { source, object } of items) {
  const what = `${source}: ${object.kind}/${object.metadata?.name}`;
  const validate = await validatorFor(object.apiVersion, object.kind);
  if (!validate) {
    console.log(`${what}: no schema for ${object.apiVersion} ${object.kind}`);
    problems++;
    continue;
  }
  const seen = new Map();
  const ok = validate(track(object, "", seen));
  for (const e of ok ? [] : validate.errors) {
    console.log(`${what}: ${e.instancePath || "/"} ${e.keyword}: ${JSON.stringify(e.params)}`);
    problems++;
  }
  for (const path of unknownFields(seen)) {
    console.log(`${what}: ${path}: not a field of ${object.kind} ${object.apiVersion}`);
    problems++;
  }
  counts[object.kind] = (counts[object.kind] ?? 0) + 1;
}
const summary = Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(", ");
console.error(`[crd] ${items.length} custom resources checked against their CRD schemas (${summary}); ${problems} problems`);
process.exit(problems ? 1 : 0);
