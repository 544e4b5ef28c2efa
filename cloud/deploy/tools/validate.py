#!/usr/bin/env python3
"""Offline validation of cloud/deploy: called by cloud/deploy/test, which renders the overlays,
builds the binaries and collects their metric expositions first.

    validate.py manifests --rendered DIR --k8s-version 1.32
    validate.py monitoring --expositions FILE... --runbooks docs/runbooks.md --work DIR
    validate.py iam

`manifests` validates every rendered object: built-in kinds against the Kubernetes OpenAPI
schemas bundled in kubernetes-validate (strict: unknown fields fail), custom resources against
their CRDs' schemas (tools/crd-validate.mjs); then the house rules (security context, probes,
resources, spool, placement) and the agreements between files (the config's group, topics,
brokers and port against the ScaledObjects, PodMonitor, probes and NetworkPolicies; KEDA's
maxReplicaCount against the topics' partitions).

`monitoring` checks the alert rules (promtool check rules, promtool test rules, a runbook section
for every alert) and the dashboards (JSON, PromQL syntax through promtool), and that every metric
and label either of them uses is one that edgeflow-agent or edgeflow-aggregator exports.

`iam` parses the policy documents, lints them with parliament (unknown actions, condition keys,
resource types), and checks that they agree with the manifests (bucket, prefix, service account).

Exit status 1 and one line per problem if anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from collections import defaultdict
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
REPO = DEPLOY.parent.parent
problems: list[str] = []
quiet = False


def problem(msg: str) -> None:
    problems.append(msg)
    if not quiet:
        print(f"  FAIL {msg}", file=sys.stderr)


def info(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr)


def finish(what: str) -> None:
    if problems:
        print(f"[{what}] {len(problems)} problems", file=sys.stderr)
        sys.exit(1)
    print(f"[{what}] ok", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------------

CUSTOM_GROUPS = ("keda.sh", "monitoring.coreos.com", "kafka.strimzi.io")


def is_custom(obj: dict) -> bool:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    return group in CUSTOM_GROUPS


def load_rendered(rendered: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted(rendered.glob("*.yaml")):
        out[f.stem] = [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def validate_schemas(overlays: dict[str, list[dict]], k8s_version: str) -> None:
    import kubernetes_validate

    custom = []
    builtin = 0
    for name, objs in overlays.items():
        for obj in objs:
            what = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            if is_custom(obj):
                custom.append({"source": name, "object": obj})
                continue
            try:
                kubernetes_validate.validate(obj, k8s_version, strict=True)
                builtin += 1
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                problem(f"{what}: /{path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problem(f"{what}: {e.message}")
    info(f"{builtin} built-in objects valid against the Kubernetes {k8s_version} schemas (strict)")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(custom, f)
    node = subprocess.run(["node", str(DEPLOY / "tools" / "crd-validate.mjs"), f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    for line in node.stdout.splitlines():
        problem(line)
    info(node.stderr.strip().removeprefix("[crd] "))
    if node.returncode and not node.stdout.strip():
        problem(f"crd-validate.mjs failed: {node.stderr.strip()}")


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def topic_partitions() -> dict[str, int]:
    topics = yaml.safe_load_all((DEPLOY / "components/strimzi-topics/topics.yaml").read_text())
    return {t["metadata"]["name"]: t["spec"]["partitions"] for t in topics if t}


def check_house_rules(name: str, objs: list[dict]) -> None:
    deployments = [d for d in by_kind(objs, "Deployment")
                   if d["metadata"]["labels"].get("app.kubernetes.io/name") == "edgeflow-aggregator"]
    if not deployments:
        problem(f"{name}: no edgeflow-aggregator Deployment")
        return
    configmaps = {c["metadata"]["name"]: c for c in by_kind(objs, "ConfigMap")}
    accounts = {s["metadata"]["name"] for s in by_kind(objs, "ServiceAccount")}
    partitions = topic_partitions()
    config = None
    for d in deployments:
        dn = f"{name}: Deployment/{d['metadata']['name']}"
        pod = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not matches(d["spec"]["selector"], labels):
            problem(f"{dn}: selector does not match the pod labels")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problem(f"{dn}: pod securityContext.runAsNonRoot must be true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problem(f"{dn}: seccompProfile must be RuntimeDefault")
        if pod.get("serviceAccountName") not in accounts:
            problem(f"{dn}: serviceAccountName {pod.get('serviceAccountName')} is not in the overlay")
        [c] = pod["containers"]
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"{dn}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"{dn}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problem(f"{dn}: capabilities must drop ALL")
        kustomization = yaml.safe_load((DEPLOY / "overlays" / name / "kustomization.yaml").read_text())
        image = next((f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])
                      if i["name"] == "edgeflow-aggregator"), None)
        if c["image"] != image:
            problem(f"{dn}: image {c['image']!r}, the overlay's images: entry says {image!r}")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problem(f"{dn}: resources.{kind}.{r} missing")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") not in ports:
                problem(f"{dn}: {probe} must GET {path} on a named container port")
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        cm_name = volumes.get("config", {}).get("configMap", {}).get("name")
        if cm_name not in configmaps:
            problem(f"{dn}: config volume refers to ConfigMap {cm_name}, not in the overlay")
            continue
        config = tomllib.loads(configmaps[cm_name]["data"]["aggregator.toml"])
        listen_port = int(config.get("metrics", {}).get("listen", "0.0.0.0:9464").rsplit(":", 1)[1])
        if ports.get("http-metrics") != listen_port:
            problem(f"{dn}: containerPort http-metrics {ports.get('http-metrics')} != [metrics] listen port {listen_port}")
        stage = c["args"][0]
        env = [e["name"] for e in c.get("env", [])]
        if len(env) != len(set(env)):
            problem(f"{dn}: environment variables set twice: {env}")
        region = next((e.get("value") for e in c.get("env", []) if e["name"] == "AWS_REGION"), None)
        if stage in ("sink", "run") and region != config.get("s3", {}).get("region"):
            problem(f"{dn}: AWS_REGION {region!r} (credentials, STS) differs from [s3] region "
                    f"{config.get('s3', {}).get('region')!r}: the endpoints live in one region")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if stage in ("sink", "run"):
            spool = config.get("sink", {}).get("spool_dir", "/var/lib/edgeflow-aggregator/spool")
            vol = next((n for n, p in mounts.items() if p == spool), None)
            if vol is None or "emptyDir" not in volumes.get(vol, {}):
                problem(f"{dn}: [sink] spool_dir {spool} is not an emptyDir mount")
            elif "sizeLimit" not in volumes[vol]["emptyDir"]:
                problem(f"{dn}: the spool emptyDir has no sizeLimit")
            # The sink's drain: 20 s for uploads in flight + 10 s for checkpoints + producer flush.
            if grace < 90:
                problem(f"{dn}: terminationGracePeriodSeconds {grace} < 90: too short to drain the sink")
        # process: producer flush (30 s) + last checkpoints (15 s).
        elif grace < 60:
            problem(f"{dn}: terminationGracePeriodSeconds {grace} < 60: too short to drain process")
        if "/tmp" not in mounts.values():
            problem(f"{dn}: /tmp must be a writable mount (read-only root filesystem)")
        # Placement asked for by the overlay.
        selector = pod.get("nodeSelector", {})
        affinity = json.dumps(pod.get("affinity", {}))
        if name == "eks-hybrid" and selector.get("eks.amazonaws.com/compute-type") != "hybrid":
            problem(f"{dn}: the eks-hybrid overlay must select eks.amazonaws.com/compute-type=hybrid")
        if name == "eks" and '"NotIn"' not in affinity:
            problem(f"{dn}: the eks overlay must keep the aggregator off hybrid nodes")
        # Every PodDisruptionBudget and NetworkPolicy port that targets this pod must make sense.
        pdbs = [p for p in by_kind(objs, "PodDisruptionBudget") if matches(p["spec"]["selector"], labels)]
        if len(pdbs) != 1:
            problem(f"{dn}: {len(pdbs)} PodDisruptionBudgets select it, expected 1")
        for np in by_kind(objs, "NetworkPolicy"):
            if matches(np["spec"]["podSelector"], labels):
                for rule in np["spec"].get("ingress", []):
                    for p in rule.get("ports", []):
                        if isinstance(p.get("port"), str) and p["port"] not in ports:
                            problem(f"{dn}: NetworkPolicy/{np['metadata']['name']} names port {p['port']}")
    for pm in by_kind(objs, "PodMonitor"):
        if pm["metadata"]["name"] != "edgeflow-aggregator":
            continue
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep["port"] != "http-metrics":
                problem(f"{name}: PodMonitor scrapes port {ep['port']}, the pods name theirs http-metrics")
    # KEDA agrees with the config and the topics.
    if config is None:
        return
    kafka = config.get("kafka", {})
    group = kafka.get("group_id", "edgeflow-aggregator")
    expect = {
        "edgeflow-process": (f"{group}-process", {kafka.get("raw_topic", "raw-data")}),
        "edgeflow-sink": (f"{group}-sink", {kafka.get("processed_topic", "processed-data"), kafka.get("dlq_topic", "raw-data-dlq")}),
    }
    deployment_names = {d["metadata"]["name"] for d in deployments}
    for so in by_kind(objs, "ScaledObject"):
        sn = f"{name}: ScaledObject/{so['metadata']['name']}"
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in deployment_names:
            problem(f"{sn}: scales {target}, which is not in the overlay")
            continue
        if any("replicas" in d["spec"] for d in deployments if d["metadata"]["name"] == target):
            problem(f"{sn}: {target} still sets spec.replicas (a kubectl apply would undo KEDA)")
        want_group, want_topics = expect[target]
        topics = set()
        for t in so["spec"]["triggers"]:
            m = t["metadata"]
            topics.add(m["topic"])
            if m["consumerGroup"] != want_group:
                problem(f"{sn}: consumerGroup {m['consumerGroup']}, the config's is {want_group}")
            if m["bootstrapServers"] != kafka.get("brokers"):
                problem(f"{sn}: bootstrapServers {m['bootstrapServers']} != [kafka] brokers {kafka.get('brokers')}")
            limit = partitions.get(m["topic"])
            if limit is None:
                problem(f"{sn}: topic {m['topic']} is not one of the KafkaTopics")
            elif so["spec"]["maxReplicaCount"] > limit:
                problem(f"{sn}: maxReplicaCount {so['spec']['maxReplicaCount']} > {limit} partitions of {m['topic']}")
        if topics != want_topics:
            problem(f"{sn}: triggers on {sorted(topics)}, the stage reads {sorted(want_topics)}")
        if so["spec"].get("minReplicaCount", 0) < 1:
            problem(f"{sn}: minReplicaCount must be >= 1 (idle partitions need a consumer to seal hours)")


def check_kafka_access(name: str, objs: list[dict]) -> None:
    """The edge listener authenticates, ACLs are on, and no agent may write processed-data."""
    for k in by_kind(objs, "Kafka"):
        spec = k["spec"]["kafka"]
        if spec.get("authorization", {}).get("type") != "simple":
            problem(f"{name}: Kafka/{k['metadata']['name']}: authorization must be simple (ACLs)")
        for listener in spec.get("listeners", []):
            if listener.get("type") in ("nodeport", "loadbalancer", "route", "ingress"):
                if not listener.get("tls") or listener.get("authentication", {}).get("type") not in ("tls", "scram-sha-512"):
                    problem(f"{name}: listener {listener['name']} is reachable from outside the cluster "
                            "without TLS and client authentication")
    agents = [u for u in by_kind(objs, "KafkaUser") if u["metadata"]["name"].startswith("edgeflow-agent-")]
    if by_kind(objs, "Kafka") and not agents:
        problem(f"{name}: no edgeflow-agent-* KafkaUser: agents could not connect")
    for u in agents:
        for acl in u["spec"].get("authorization", {}).get("acls", []):
            r = acl["resource"]
            writes = {"Write", "All", "Create", "Delete", "Alter"} & set(acl.get("operations", []))
            if acl.get("type", "allow") == "allow" and writes and r.get("type") == "topic" \
                    and r.get("name") not in ("raw-data", "raw-data-dlq"):
                problem(f"{name}: KafkaUser/{u['metadata']['name']} may {sorted(writes)} topic {r.get('name')}: "
                        "agents write raw-data and raw-data-dlq only")


def cmd_manifests(args) -> None:
    overlays = load_rendered(Path(args.rendered))
    print(f"[manifests] {', '.join(f'{k} ({len(v)} objects)' for k, v in overlays.items())}", file=sys.stderr)
    validate_schemas(overlays, args.k8s_version)
    for name, objs in overlays.items():
        if name in ("local", "eks", "eks-hybrid"):
            check_house_rules(name, objs)
        check_kafka_access(name, objs)
    info("house rules and cross-file agreements checked for local, eks, eks-hybrid")
    finish("manifests")


# ------------------------------------------------------------------------------------------------
# monitoring
# ------------------------------------------------------------------------------------------------

# Labels that Prometheus adds to every series of a target (PodMonitor and ScrapeConfig relabelings
# included); a query may use them on any metric.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service", "component", "node"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan",
            # Aggregation operators: `sum by (x) (...)` puts the grouping between name and parenthesis.
            "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
            "count_values", "group", "limitk", "limit_ratio"}
# Series that Prometheus itself creates for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
GRAFANA_VARS = [(re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}"), "5m"),
                (re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?"), ".*")]


def parse_exposition(text: str, known: dict[str, set[str]]) -> None:
    """Adds every sample name with its label names; families without samples by their type."""
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, typ = line.split(maxsplit=3)
            types[fam] = typ
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
            if m:
                labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
                known.setdefault(m.group(1), set()).update(labels)
    for fam, typ in types.items():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "info": ["_info"], "summary": ["_sum", "_count", ""]}.get(typ, [""])
        for s in suffixes:
            known.setdefault(fam + s, {"le"} if s == "_bucket" else set())


def promql_refs(expr: str):
    """The metric names an expression selects, with the labels matched on each, and the labels
    it groups or matches on (by/without/on/ignoring/group_*)."""
    for pattern, repl in GRAFANA_VARS:
        expr = pattern.sub(repl, expr)
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    i, n = 0, len(expr)
    last_ident = None
    while i < n:
        ch = expr[i]
        if ch in "\"'`":
            j = expr.index(ch, i + 1)
            i = j + 1
            continue
        if ch == "[":
            i = expr.index("]", i) + 1
            continue
        if ch == "{":
            j = i + 1
            depth_str = None
            while expr[j] != "}" or depth_str:
                if expr[j] in "\"'`":
                    depth_str = None if depth_str == expr[j] else (depth_str or expr[j])
                j += 1
            body = expr[i + 1:j]
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"', body))
            if last_ident is not None:
                selectors[last_ident] = (selectors[last_ident][0], labels)
            else:
                name = re.search(r'__name__\s*=\s*"([^"]+)"', body)
                selectors.append((name.group(1) if name else "", labels - {"__name__"}))
            last_ident = None
            i = j + 1
            continue
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr[i:])
        if m and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "._")):
            word = m.group(0)
            j = i + len(word)
            rest = expr[j:].lstrip()
            if word in ("by", "without", "on", "ignoring", "group_left", "group_right") and rest.startswith("("):
                k = expr.index(")", j)
                grouping.update(w.strip() for w in expr[expr.index("(", j) + 1:k].split(",") if w.strip())
                i = k + 1
                last_ident = None
                continue
            if rest.startswith("(") or word.lower() in KEYWORDS:
                last_ident = None
            else:
                selectors.append((word, set()))
                last_ident = len(selectors) - 1
            i = j
            continue
        if not ch.isspace():
            last_ident = None if ch not in "{" else last_ident
        i += 1
    return selectors, grouping


def check_expr(where: str, expr: str, known: dict[str, set[str]]) -> int:
    selectors, grouping = promql_refs(expr)
    if not selectors:
        problem(f"{where}: selects no metric: {expr}")
    available = set(TARGET_LABELS)
    for name, labels in selectors:
        if name in SYNTHETIC:
            available |= TARGET_LABELS
            unknown = labels - TARGET_LABELS
        elif name not in known:
            problem(f"{where}: metric {name!r} is not exported by edgeflow-agent or edgeflow-aggregator")
            continue
        else:
            available |= known[name]
            unknown = labels - known[name] - TARGET_LABELS
        if unknown:
            problem(f"{where}: {name} has no label {', '.join(sorted(unknown))}")
    missing = grouping - available
    if missing:
        problem(f"{where}: groups or matches on {', '.join(sorted(missing))}, which no selected metric has")
    return len(selectors)


def self_test(known: dict[str, set[str]]) -> None:
    """The checker must catch what it is for: a fake name, a fake label, a fake grouping label."""
    sample = {"edgeflow_x_total": {"reason"}, "edgeflow_y_bucket": {"le"}}
    sel, grp = promql_refs('sum by (instance, le) (rate(edgeflow_y_bucket{job="a", instance=~"$instance"}[$__rate_interval]))'
                           ' / on (instance) group_left edgeflow_x_total{reason!="b"} > 0 and up == 1 offset 5m')
    assert [s[0] for s in sel] == ["edgeflow_y_bucket", "edgeflow_x_total", "up"], sel
    assert sel[0][1] == {"job", "instance"} and sel[1][1] == {"reason"}, sel
    assert grp == {"instance", "le"}, grp
    global quiet
    before, quiet = len(problems), True
    check_expr("self-test", "rate(edgeflow_nope_total[5m])", sample)
    check_expr("self-test", 'edgeflow_x_total{stage="p"}', sample)
    check_expr("self-test", "sum by (kind) (edgeflow_x_total)", sample)
    caught = len(problems) - before
    del problems[before:]
    quiet = False
    if caught != 3:
        problem(f"metric checker self-test caught {caught} of 3 planted mistakes")


def runbook_anchors(path: Path) -> set[str]:
    anchors = set()
    for line in path.read_text().splitlines():
        m = re.match(r"#{2,3} (.+)", line)
        if m:
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def cmd_monitoring(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    known: dict[str, set[str]] = {}
    for f in args.expositions:
        parse_exposition(Path(f).read_text(), known)
    print(f"[monitoring] {len(known)} series names from {len(args.expositions)} expositions", file=sys.stderr)
    self_test(known)

    # Alert rules.
    rule = yaml.safe_load((DEPLOY / "monitoring/prometheusrule.yaml").read_text())
    spec = rule["spec"]
    rules_file = work / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    run(["promtool", "check", "rules", str(rules_file)], "promtool check rules")
    anchors = runbook_anchors(Path(args.runbooks))
    alerts, selectors = 0, 0
    for group in spec["groups"]:
        for r in group["rules"]:
            where = f"rule {r.get('alert') or r.get('record')}"
            selectors += check_expr(where, str(r["expr"]), known)
            if "alert" not in r:
                continue
            alerts += 1
            ann = r.get("annotations", {})
            if r.get("labels", {}).get("severity") not in ("critical", "warning"):
                problem(f"{where}: severity must be critical or warning")
            for key in ("summary", "description", "runbook_url"):
                if not ann.get(key):
                    problem(f"{where}: annotation {key} missing")
            url = ann.get("runbook_url", "")
            anchor = url.rsplit("#", 1)[-1]
            if not url.endswith(f"docs/runbooks.md#{r['alert'].lower()}") or anchor not in anchors:
                problem(f"{where}: runbook_url {url!r} has no section `## {r['alert']}` in {args.runbooks}")
    info(f"{alerts} alerts: metrics and labels exported, severity, summary, description, runbook section")
    # Unit tests on the rules' logic (annotations stripped, see the test file's header).
    tests = work / "tests"
    tests.mkdir(exist_ok=True)
    for group in spec["groups"]:
        for r in group["rules"]:
            r.pop("annotations", None)
    (tests / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for t in (DEPLOY / "monitoring/tests").glob("*.test.yaml"):
        (tests / t.name).write_text(t.read_text())
        run(["promtool", "test", "rules", str(tests / t.name)], f"promtool test rules {t.name}")
    tested = {t["alertname"] for f in (DEPLOY / "monitoring/tests").glob("*.test.yaml")
              for case in yaml.safe_load(f.read_text())["tests"] for t in case.get("alert_rule_test", [])
              if any(t.get("exp_alerts") or [])}
    untested = {r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r} - tested
    if untested:
        problem(f"alerts with no unit test that makes them fire: {', '.join(sorted(untested))}")
    else:
        info(f"every alert has a promtool test that makes it fire ({len(tested)})")

    # Dashboards.
    uids, exprs = set(), []
    for f in sorted((DEPLOY / "monitoring/dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        if d["uid"] in uids:
            problem(f"{f.name}: uid {d['uid']} used twice")
        uids.add(d["uid"])
        if not any(v["name"] == "datasource" and v["type"] == "datasource" for v in d["templating"]["list"]):
            problem(f"{f.name}: no `datasource` variable")
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                exprs.append((f"{f.name} variable {v['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", v["definition"])))
        for p in d["panels"]:
            if p["type"] == "row":
                continue
            if p.get("datasource", {}).get("uid") != "${datasource}":
                problem(f"{f.name}: panel {p['title']!r} does not use the datasource variable")
            if not p.get("targets"):
                problem(f"{f.name}: panel {p['title']!r} has no query")
            for t in p.get("targets", []):
                exprs.append((f"{f.name} panel {p['title']!r}", t["expr"]))
    for where, expr in exprs:
        selectors += check_expr(where, expr, known)
    # PromQL syntax of every dashboard query, through promtool (as recording rules).
    syntax = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _concrete(e)} for i, (_, e) in enumerate(exprs)]}]}
    (work / "dashboards-as-rules.yaml").write_text(yaml.safe_dump(syntax, sort_keys=False))
    run(["promtool", "check", "rules", str(work / "dashboards-as-rules.yaml")], "dashboard queries parse")
    info(f"{len(uids)} dashboards, {len(exprs)} queries; {selectors} metric selectors in rules and dashboards all exported")

    # Plain Prometheus scrape config for the agents.
    run(["promtool", "check", "config", "--syntax-only", str(DEPLOY / "monitoring/prometheus-agents.yaml")],
        "promtool check config prometheus-agents.yaml")
    finish("monitoring")


def _concrete(expr: str) -> str:
    for pattern, repl in GRAFANA_VARS:
        expr = pattern.sub(repl, expr)
    return expr


def run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        problem(f"{what}:\n{r.stdout}{r.stderr}")
    else:
        last = (r.stdout.strip() or r.stderr.strip()).splitlines()
        info(f"{what}: {last[-1].strip() if last else 'ok'}")


# ------------------------------------------------------------------------------------------------
# iam
# ------------------------------------------------------------------------------------------------

def cmd_iam(args) -> None:
    from parliament import analyze_policy_string

    iam = DEPLOY / "iam"
    docs = {}
    for f in sorted(iam.glob("*.json")):
        try:
            docs[f.name] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            problem(f"{f.name}: not JSON: {e}")
    for name, doc in docs.items():
        if doc.get("Version") != "2012-10-17" or not isinstance(doc.get("Statement"), list):
            problem(f"{name}: needs Version 2012-10-17 and a Statement list")
        sids = [s.get("Sid") for s in doc["Statement"]]
        if len(set(sids)) != len(sids) or not all(sids):
            problem(f"{name}: every statement needs a unique Sid")
        if name == "irsa-trust-policy.json":
            continue  # a trust policy has no Resource; checked below
        for finding in analyze_policy_string(json.dumps(doc), ignore_private_auditors=True).findings:
            problem(f"{name}: parliament {finding.issue}: {finding.detail}")
    info(f"{len(docs)} policy documents parse; parliament finds nothing in the identity and bucket policies")

    # The documents agree with each other and with the manifests.
    base = tomllib.loads((DEPLOY / "base/aggregator.toml").read_text())
    bucket, prefix = base["s3"]["bucket"], base["s3"]["prefix"]
    want = f"arn:aws:s3:::{bucket}/{prefix}/*"
    for name in ("aggregator-policy.json", "verify-policy.json"):
        resources = {r for s in docs[name]["Statement"] for r in _list(s.get("Resource"))}
        if want not in resources:
            problem(f"{name}: does not grant on {want} ([s3] bucket/prefix of base/aggregator.toml)")
    vpces = {v for d in docs.values() for s in d["Statement"] for cond in s.get("Condition", {}).values()
             for k, v in cond.items() if k == "aws:SourceVpce"}
    if len(vpces) != 1:
        problem(f"policies disagree on the VPC endpoint: {sorted(map(str, vpces))}")
    trust = docs["irsa-trust-policy.json"]["Statement"][0]
    sa = yaml.safe_load_all((DEPLOY / "base/serviceaccounts.yaml").read_text())
    sink = next(s for s in sa if s and s["metadata"]["name"] == "edgeflow-sink")
    namespace = yaml.safe_load((DEPLOY / "base/kustomization.yaml").read_text())["namespace"]
    subject = f"system:serviceaccount:{namespace}:{sink['metadata']['name']}"
    conds = trust.get("Condition", {}).get("StringEquals", {})
    if trust.get("Action") != "sts:AssumeRoleWithWebIdentity" or ":oidc-provider/" not in trust["Principal"].get("Federated", ""):
        problem("irsa-trust-policy.json: must let the cluster's OIDC provider AssumeRoleWithWebIdentity")
    if not any(k.endswith(":sub") and v == subject for k, v in conds.items()):
        problem(f"irsa-trust-policy.json: :sub must be {subject}")
    if not any(k.endswith(":aud") and v == "sts.amazonaws.com" for k, v in conds.items()):
        problem("irsa-trust-policy.json: :aud must be sts.amazonaws.com")
    role = sink["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    info(f"bucket {bucket}, prefix {prefix}/, one VPC endpoint, trust for {subject} (role {role.rsplit('/', 1)[-1]})")
    finish("iam")


def _list(v):
    return v if isinstance(v, list) else [v] if v else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--rendered", required=True)
    m.add_argument("--k8s-version", default="1.32")
    mo = sub.add_parser("monitoring")
    mo.add_argument("--expositions", nargs="+", required=True)
    mo.add_argument("--runbooks", default=str(REPO / "docs/runbooks.md"))
    mo.add_argument("--work", required=True)
    sub.add_parser("iam")
    args = ap.parse_args()
    {"manifests": cmd_manifests, "monitoring": cmd_monitoring, "iam": cmd_iam}[args.cmd](args)


if __name__ == "__main__":
    main()
