"""What the schema checks cannot see in deploy/, Dockerfile and docker-compose.yml: the
rules this repository's deployment promises (security context on every pod, one replica
for the single node, probes on /healthz and /readyz, ...) and that every name in them
still matches the service (settings in src/config.rs, metrics in src/).

Run from the repository root with PyYAML: python deploy/check.py
"""

import copy
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append((name, None))
        except AssertionError as e:
            results.append((name, str(e) or "assertion failed"))
        return fn

    return wrap


def manifests():
    for path in sorted(KUBE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.relative_to(ROOT), doc


def workloads():
    return [(p, d) for p, d in manifests() if d["kind"] in ("StatefulSet", "Deployment")]


def service_env_vars():
    """Every environment variable src/config.rs reads, and RUST_LOG."""
    source = (ROOT / "src" / "config.rs").read_text()
    return set(re.findall(r'env = "([A-Z_]+)"', source)) | {"RUST_LOG"}


def source_strings():
    return "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.rs"))


def metric_names(expr):
    """The metric names in a PromQL expression: its identifiers less the language's words
    and label names, quoted values and dashboard variables dropped first."""
    expr = re.sub(r'"[^"]*"|\$\w+', "", expr)
    names = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?:\{|\[|\)|$|\s)", expr))
    keywords = {"sum", "by", "rate", "increase", "histogram_quantile", "count", "unless",
                "on", "vector", "max", "min", "and", "or", "bool", "le", "route", "status",
                "instance", "job", "up"}
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names - keywords
            if "_" in n}


@check("every pod runs as non-root, read-only, without privilege escalation or capabilities")
def _():
    found = workloads()
    assert len(found) >= 2, "no workloads found"
    for path, doc in found:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, f"{path}: runAsNonRoot"
        assert pod["securityContext"]["runAsUser"] == 10001, f"{path}: the image's user is 10001"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{path}: allowPrivilegeEscalation"
            assert sc["readOnlyRootFilesystem"] is True, f"{path}: readOnlyRootFilesystem"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{path}: capabilities"


@check("probes: liveness on /healthz, readiness on /readyz; memory requested and limited")
def _():
    for path, doc in workloads():
        for c in doc["spec"]["template"]["spec"]["containers"]:
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", path
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", path
            assert c["resources"]["requests"]["memory"], path
            assert c["resources"]["limits"]["memory"], path


def component(doc):
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def single_node():
    """The single node's workloads, by the store each runs on (its directory's name)."""
    return {p.parent.name: (p, d) for p, d in workloads() if component(d) == "single-node"}


@check("single node: Deployments of one replica, Recreate, on one ReadWriteOncePod claim made once")
def _():
    kinds = {d["kind"] for _, d in manifests()}
    # volumeClaimTemplates give every replica a claim of its own: a second replica would
    # serve an empty store behind the same Service.
    assert "StatefulSet" not in kinds, "a StatefulSet: each replica would get its own volume"
    found = single_node()
    assert set(found) == {"embedded", "postgres"}, sorted(found)
    claims = {d["metadata"]["name"]: d for _, d in manifests()
              if d["kind"] == "PersistentVolumeClaim"}
    for path, doc in found.values():
        spec = doc["spec"]
        assert doc["kind"] == "Deployment", f"{path}: {doc['kind']}"
        assert spec["replicas"] == 1, f"{path}: the WAL is local state: one replica"
        assert spec["strategy"] == {"type": "Recreate"}, f"{path}: the old pod stops first"
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 60, f"{path}: drain + final flush"
        volumes = {v["name"]: v for v in pod["volumes"]}
        claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
        assert claim in claims, f"{path}: its claim {claim} is made by no manifest"
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOncePod"], \
            f"{claim}: one pod at a time, so a second replica stays Pending"
        container = pod["containers"][0]
        mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"}
        config = next(d for p, d in manifests() if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == container["envFrom"][0]["configMapRef"]["name"])
        assert config["data"]["WIDGETS_DATA_DIR"] in mounts, f"{path}: the data dir is the volume"
    names = {d["metadata"]["name"] for _, d in found.values()}
    for path, doc in manifests():
        if doc["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
            target = doc["spec"].get("scaleTargetRef", {}).get("name")
            selects = doc["spec"].get("selector", {}).get("matchLabels", {})
            assert target not in names, f"{path} scales the single node"
            assert selects.get("app.kubernetes.io/component") != "single-node", path


@check("single node: the two Deployments differ only in DATABASE_URL")
def _():
    found = single_node()
    embedded = copy.deepcopy(found["embedded"][1])
    postgres = copy.deepcopy(found["postgres"][1])
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "DATABASE_URL"]
    assert embedded == postgres, "embedded/ and postgres/ have drifted apart"


def secret_refs(container):
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


@check("Secrets are required: a missing one stops the pod instead of changing what it does")
def _():
    for path, doc in workloads():
        for c in doc["spec"]["template"]["spec"]["containers"]:
            refs = secret_refs(c)
            for name, ref in refs.items():
                assert not ref.get("optional", False), f"{path}: {name} from an optional Secret"
            for source in c.get("envFrom", []):
                assert not source.get("secretRef", {}).get("optional", False), path
            # Off, auth fails open: writes from anyone who reaches the Service.
            assert "WIDGETS_AUTH_TOKEN" in refs, f"{path}: no bearer token"
            env = {e["name"] for e in c.get("env", [])}
            if path.parent.name == "embedded":
                assert "DATABASE_URL" not in env, f"{path}: the embedded store has no URL"
            else:
                assert "DATABASE_URL" in refs, f"{path}: DATABASE_URL from a Secret"


def seconds(duration):
    """A setting's duration ("500ms", "10s", "2m", "1h") in seconds."""
    value, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", str(duration).strip()).groups()
    return int(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def setting_default(env):
    """A setting's default as src/config.rs declares it."""
    source = (ROOT / "src" / "config.rs").read_text()
    return re.search(rf'env = "{env}", default_value = "([^"]+)"', source).group(1)


def stop_needs(settings):
    """Seconds a graceful stop may take with these settings: the drain, then the last
    flush, each bounded by its timeout."""
    return sum(seconds(settings.get(env, setting_default(env)))
               for env in ("WIDGETS_DRAIN_TIMEOUT", "WIDGETS_FINAL_FLUSH_TIMEOUT"))


@check("every grace period covers the preStop pause, the drain and the last flush")
def _():
    for path, doc in workloads():
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        names = [e["configMapRef"]["name"] for e in container.get("envFrom", [])]
        settings = {}
        for _, cm in manifests():
            if cm["kind"] == "ConfigMap" and cm["metadata"]["name"] in names:
                settings.update(cm["data"])
        settings.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        needs = pause + stop_needs(settings)
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= needs, f"{path}: a grace of {grace} s, a stop that may take {needs} s"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in compose.items():
        if "stop_grace_period" in service:
            grace = seconds(service["stop_grace_period"])
            environment = service.get("environment", {})
            if isinstance(environment, list):  # the `- NAME=value` form
                environment = dict(e.split("=", 1) for e in environment if "=" in e)
            needs = stop_needs(environment)
            assert grace >= needs, f"docker-compose.yml {name}: {grace} s, needs {needs} s"


@check("Redis mode: a Deployment of two or more, its PDB and autoscalers select it")
def _():
    deployments = [d for _, d in workloads() if component(d) == "redis-mode"]
    assert len(deployments) == 1 and deployments[0]["kind"] == "Deployment", deployments
    dep = deployments[0]
    assert dep["spec"]["replicas"] >= 2
    labels = dep["spec"]["template"]["metadata"]["labels"]
    kinds = {}
    for path, doc in manifests():
        kinds.setdefault(doc["kind"], []).append(doc)
        if doc["kind"] == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), path
        if doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], path
            assert doc["spec"]["minReplicas"] >= 2, path
    assert kinds.get("PodDisruptionBudget") and kinds.get("HorizontalPodAutoscaler")


@check("every Service selects pods of a workload")
def _():
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for _, d in workloads()]
    for path, doc in manifests():
        if doc["kind"] == "Service" and doc["spec"].get("type") != "ExternalName":
            sel = doc["spec"]["selector"]
            assert any(sel.items() <= labels.items() for labels in pod_labels), path


@check("ConfigMaps, Secrets and compose set only settings the service has")
def _():
    known = service_env_vars()
    assert {"WIDGETS_LOG_FORMAT", "WIDGETS_MAX_DIRTY", "DATABASE_URL"} <= known, known
    for path, doc in manifests():
        if doc["kind"] == "ConfigMap":
            unknown = set(doc["data"]) - known
            assert not unknown, f"{path}: {unknown}"
        if doc["kind"] == "Secret":
            unknown = set(doc["stringData"]) - known
            assert not unknown, f"{path}: {unknown}"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("widgets", "widgets-redis"):
        unknown = set(compose["services"][name].get("environment", {})) - known
        assert not unknown, f"docker-compose.yml {name}: {unknown}"


@check("compose: single node, and two Redis-mode instances behind the load balancer")
def _():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["widgets"]["profiles"] == ["single"]
    assert services["widgets"]["build"]["args"]["FEATURES"] == ""
    redis = services["widgets-redis"]
    assert redis["profiles"] == ["redis"] and redis["deploy"]["replicas"] >= 2
    assert redis["build"]["args"]["FEATURES"] == "redis"
    assert redis["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert redis["environment"]["DATABASE_URL"].startswith("postgres://postgres@postgres:")
    assert services["lb"]["profiles"] == ["redis"]
    cfg = (ROOT / "deploy" / "compose" / "haproxy.cfg").read_text()
    assert re.search(r"server-template \S+ \d+ widgets-redis:8080", cfg), "haproxy targets"
    assert "GET /readyz" in cfg
    for name in ("postgres", "redis"):
        assert "profiles" not in services[name], "docker compose up -d still starts it alone"


@check("Dockerfile: the user the manifests run as, SIGTERM, the data volume")
def _():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001:10001" in text
    assert "STOPSIGNAL SIGTERM" in text
    assert 'VOLUME ["/data"]' in text
    assert "cargo build --release --locked -p widgets" in text


@check("Dockerfile: the toolchain its comment names is Cargo.toml's rust-version, the tag newer")
def _():
    text = (ROOT / "Dockerfile").read_text()
    wanted = re.search(r'^rust-version = "(\d+)\.(\d+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    said = re.search(r"Rust (\d+)\.(\d+) or newer", text)
    tag = re.search(r"^FROM rust:(\d+)\.(\d+)", text, re.M)
    assert wanted and said and tag, "rust-version, the Dockerfile's comment or its FROM rust:"
    version = lambda m: (int(m.group(1)), int(m.group(2)))
    assert version(said) == version(wanted), f"the comment says {said.group(0)}, Cargo.toml {wanted.group(0)}"
    assert version(tag) >= version(wanted), f"{tag.group(0)} is older than {wanted.group(0)}"


@check(".dockerignore leaves out every local-only path .gitignore names")
def _():
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for line in (ROOT / ".gitignore").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            top = line.strip().lstrip("/").split("/")[0]
            assert top in ignored, f".gitignore's {line.strip()} is sent in the build context"


@check("every metric the alerts, the dashboard and the adapter use exists in src/")
def _():
    source = source_strings()
    exprs = []
    for group in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]:
        exprs += [r["expr"] for r in group["rules"]]
    dashboard = json.loads((ROOT / "deploy/grafana/widgets.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    adapter = yaml.safe_load((ROOT / "deploy/prometheus/adapter-rules.yaml").read_text())
    exprs += [r["seriesQuery"] for r in adapter["rules"]]
    names = set().union(*(metric_names(e) for e in exprs))
    assert "widgets_flush_lag_seconds" in names and "http_requests_total" in names, names
    missing = sorted(n for n in names if f'"{n}"' not in source)
    assert not missing, f"not in src/: {missing}"


@check("dashboard: unique panel ids, every query on the datasource variable")
def _():
    dashboard = json.loads((ROOT / "deploy/grafana/widgets.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "max_dirty", "wal_max_bytes"} <= variables
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]


def default_flush_intervals():
    """The flush interval src/config.rs defaults to: (embedded store, PostgreSQL and Redis
    mode), in seconds."""
    source = (ROOT / "src" / "config.rs").read_text()
    embedded = re.search(r"const EMBEDDED_FLUSH_INTERVAL: Duration = Duration::from_secs\((\d+)\)",
                         source)
    other = re.search(r"EMBEDDED_FLUSH_INTERVAL\s*\}\s*else\s*\{\s*Duration::from_secs\((\d+)\)",
                      source)
    assert embedded and other, "src/config.rs: the flush interval's defaults not found"
    return int(embedded.group(1)), int(other.group(1))


def lag_thresholds(alert):
    """An alert's flush-lag thresholds: (embedded store, other stores), told apart by
    widgets_store_file_bytes, which only the embedded store exports."""
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    expr = next(r["expr"] for g in rules for r in g["rules"] if r.get("alert") == alert)
    found = dict((op, int(t)) for t, op in re.findall(
        r'widgets_flush_lag_seconds\{job="widgets"\} > (\d+)\s+(and|unless) on \(job, instance\)',
        expr))
    assert set(found) == {"and", "unless"}, f"{alert}: no threshold per store in {expr}"
    return found["and"], found["unless"]


@check("flush-lag alert: a threshold per store, past two of its default flush intervals")
def _():
    embedded, other = lag_thresholds("WidgetsFlushLagHigh")
    interval_embedded, interval_other = default_flush_intervals()
    # A healthy flush cycle takes the lag to about one interval (plus the flush).
    assert embedded >= 2 * interval_embedded, f"embedded: {embedded} s, interval {interval_embedded} s"
    assert other >= 2 * interval_other, f"other stores: {other} s, interval {interval_other} s"


def default_ready_max_flush_lag(interval):
    """/readyz's bound on the flush lag src/config.rs defaults to, for a flush interval."""
    source = (ROOT / "src" / "config.rs").read_text()
    found = re.search(r"\((\d+) \* self\.flush_interval\(\)\)\s*\.max\(Duration::from_secs\((\d+)\)\)",
                      source)
    assert found, "src/config.rs: --ready-max-flush-lag's default not found"
    return max(int(found.group(1)) * interval, int(found.group(2)))


@check("flush_stalled alert: at /readyz's default bound per store, past the flush-lag alert's")
def _():
    embedded, other = lag_thresholds("WidgetsFlushStalled")
    interval_embedded, interval_other = default_flush_intervals()
    bounds = (default_ready_max_flush_lag(interval_embedded),
              default_ready_max_flush_lag(interval_other))
    assert (embedded, other) == bounds, f"{(embedded, other)} s, /readyz's bounds {bounds} s"
    high = lag_thresholds("WidgetsFlushLagHigh")
    assert high[0] < embedded and high[1] < other, f"{high} s, stalled at {bounds} s"


@check("the states where /readyz refuses a running single node each have an alert")
def _():
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    alerts = {r["alert"]: r for g in rules for r in g["rules"] if "alert" in r}
    # With one replica, not ready means no endpoint: the operator hears of it at once.
    for name in ("WidgetsWalFailed", "WidgetsFlushStalled"):
        assert name in alerts, name
        assert alerts[name]["labels"]["severity"] == "critical", name
        assert "for" not in alerts[name], f"{name} waits before firing"


failed = [(n, e) for n, e in results if e]
for name, error in results:
    print(f"{'ok  ' if error is None else 'FAIL'} {name}" + (f"\n     {error}" if error else ""))
print(f"deploy/check.py: {len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
