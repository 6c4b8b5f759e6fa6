"""The Kubernetes manifests (deploy/k8s) and docker-compose.yml, checked without a cluster.

The base and the example overlay are rendered by tests/k8s_render.py (a small kustomize
stand-in) and every document is validated against the schemas of a pinned Kubernetes version
(kubernetes-validate, strict: unknown fields are errors). Then what the schemas cannot say:
probes, requests, a PDB and an HPA per Deployment, grace periods against the services' own
shutdown grace, every environment variable a real setting, the judge reachable only from the
writer, and docker-compose.yml in step with the manifests.
"""

import base64
import copy
import functools
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from epochlens.v1 import judge_pb2, query_pb2, writer_pb2
from services.common.config import ServiceSettings
from services.web import pages
from services.web.config import WebSettings
from tests.k8s_render import (
    ENV_FILE_TEMPLATE_SUFFIX,
    load_documents,
    parse_env_file,
    pod_spec,
    render,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "example"
KUBERNETES_VERSION = "1.32.0"
COMPONENT = "app.kubernetes.io/component"
PGBOUNCER_PORT = 6432

# Settings the manifests may use before .env.example lists them: none (every name used is
# checked against .env.example).
AWAITED_SETTINGS: set[str] = set()
# Environment variables of the pods that are not settings: the namespace, from the downward
# API, that the writer's judge address is built from.
HELPER_VARIABLES = {"POD_NAMESPACE"}
# The setting prefixes each workload may use.
PREFIXES = {"writer": ("EPOCHLENS_WRITER_", "EPOCHLENS_AUTH_"),
            "judge": ("EPOCHLENS_JUDGE_", "EPOCHLENS_AUTH_"),
            "query": ("EPOCHLENS_QUERY_", "EPOCHLENS_AUTH_"),
            "web": ("EPOCHLENS_WEB_",), "migrate": ("EPOCHLENS_MIGRATE_",)}
# The gRPC service each server reports on its health service (besides ""); the servers take
# the same names from the same descriptors (services/*/server.py SERVICE_NAME).
HEALTH_SERVICES = {
    "writer": writer_pb2.DESCRIPTOR.services_by_name["PredictionWriterService"].full_name,
    "judge": judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name,
    "query": query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name}
# Set in Kubernetes only: an optional Secret key docker-compose leaves unset.
K8S_ONLY = {"EPOCHLENS_WRITER_API_KEY_PEPPER"}


def documented_names() -> set[str]:
    """The settings .env.example documents (test_configuration.py checks that they are
    exactly the settings classes' fields; importing those classes here would take long)."""
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?(EPOCHLENS_[A-Z0-9_]+)=", text, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return render(OVERLAY)


@pytest.fixture(scope="module")
def validate() -> Iterator[Callable[[dict[str, Any]], str]]:
    """kubernetes_validate.validate, strict, for the pinned version, with each schema file
    parsed once (it parses its large definitions file again for every document)."""
    utils = kubernetes_validate.utils
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
        yield functools.partial(utils.validate, desired_version=KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module", params=["base", "overlay"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue(request.param)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments and Jobs by component label (writer, judge, query, web, migrate)."""
    return {doc["spec"]["template"]["metadata"]["labels"][COMPONENT]: doc for doc in docs
            if pod_spec(doc) is not None}


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(doc)["containers"]
    return only


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A matchLabels selector (the only form used) against a pod's labels."""
    assert set(selector) == {"matchLabels"}
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def environment(docs: list[dict[str, Any]], doc: dict[str, Any]) -> dict[str, str | None]:
    """Every variable a workload's container gets: ConfigMap keys (envFrom) and env entries
    (None for those from a Secret or the downward API)."""
    env: dict[str, str | None] = {}
    for source in container(doc).get("envFrom", []):
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container(doc).get("env", []):
        env[entry["name"]] = entry.get("value")
    return env


def port_named(doc: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container(doc)["ports"] if p["name"] == name]
    return port


def test_every_document_is_valid_for_the_pinned_kubernetes(rendered, validate):
    kinds = set()
    for doc in rendered:
        validate(doc)
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job",
            "ConfigMap", "NetworkPolicy", "ServiceAccount"} <= kinds


def test_the_validation_refuses_unknown_fields(base, validate):
    """Strict: a misspelt field is an error, not ignored."""
    doc = copy.deepcopy(named(base, "Deployment", "epochlens-writer"))
    container(doc)["readinessProbes"] = container(doc).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        validate(doc)


def test_every_deployment_has_probes_requests_one_pdb_and_one_hpa(rendered):
    deployments = of_kind(rendered, "Deployment")
    assert sorted(d["metadata"]["name"] for d in deployments) == [
        "epochlens-judge", "epochlens-query", "epochlens-web", "epochlens-writer"]
    for deployment in deployments:
        main = container(deployment)
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(main)
        assert set(main["resources"]["requests"]) == {"cpu", "memory"}
        assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
        pdbs = [p for p in of_kind(rendered, "PodDisruptionBudget")
                if selects(p["spec"]["selector"], pod_labels(deployment))]
        hpas = [h for h in of_kind(rendered, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                   "name": deployment["metadata"]["name"]}]
        assert len(pdbs) == 1 and len(hpas) == 1, deployment["metadata"]["name"]
        assert pdbs[0]["spec"]["maxUnavailable"] < hpas[0]["spec"]["minReplicas"]
        (metric,) = hpas[0]["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"


def test_grpc_probes_ask_the_health_service_on_the_served_port(rendered):
    for component, service in HEALTH_SERVICES.items():
        doc = workloads(rendered)[component]
        port = port_named(doc, "grpc")
        assert environment(rendered, doc)[f"EPOCHLENS_{component.upper()}_PORT"] == str(port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container(doc)[probe].get("grpc") or container(doc)[probe]["tcpSocket"]
            assert check["port"] in (port, "grpc")
            assert check.get("service", "") in ("", service)
        if "grpc" in container(doc)["readinessProbe"]:
            assert container(doc)["readinessProbe"]["grpc"]["service"] == service


def test_web_probes_use_routes_that_need_no_token(rendered):
    doc = workloads(rendered)["web"]
    routes = {route.path for route in pages.ROUTES}
    assert container(doc)["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for probe in ("startupProbe", "livenessProbe"):
        assert container(doc)[probe]["httpGet"]["path"] in routes
    assert environment(rendered, doc)["EPOCHLENS_WEB_PORT"] == str(port_named(doc, "http"))


def shutdown_grace(component: str, env: dict[str, str | None]) -> float:
    """The service's configured shutdown grace: its ConfigMap value, else the code default."""
    settings = WebSettings if component == "web" else ServiceSettings
    default = settings.model_fields["shutdown_grace_s"].default
    return float(env.get(f"EPOCHLENS_{component.upper()}_SHUTDOWN_GRACE_S") or default)


def test_termination_grace_covers_the_prestop_sleep_and_the_shutdown_grace(rendered):
    for component in ("writer", "judge", "query", "web"):
        doc = workloads(rendered)[component]
        command = container(doc)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        grace = shutdown_grace(component, environment(rendered, doc))
        assert grace >= ServiceSettings.model_fields["shutdown_grace_s"].default
        period = pod_spec(doc)["terminationGracePeriodSeconds"]
        assert period > float(command[1]) + grace, component


def test_every_environment_variable_is_a_real_setting_of_its_service(rendered):
    known = documented_names() | AWAITED_SETTINGS
    for component, doc in workloads(rendered).items():
        names = set(environment(rendered, doc)) - HELPER_VARIABLES
        assert sorted(names - known) == [], component
        assert [n for n in names if not n.startswith(PREFIXES[component])] == [], component
    for configmap in of_kind(rendered, "ConfigMap"):
        assert sorted(set(configmap["data"]) - known) == []


def test_secret_and_configmap_references_resolve(overlay):
    secrets = {s["metadata"]["name"]: s["data"] for s in of_kind(overlay, "Secret")}
    configmaps = {c["metadata"]["name"] for c in of_kind(overlay, "ConfigMap")}
    for component, doc in workloads(overlay).items():
        for source in container(doc).get("envFrom", []):
            assert source["configMapRef"]["name"] in configmaps
        for entry in container(doc).get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ref["key"] in secrets[ref["name"]], (component, ref["key"])
    for name, data in secrets.items():
        assert sorted(set(data) - documented_names() - AWAITED_SETTINGS) == [], name


def test_secrets_come_from_a_git_ignored_file_with_example_values():
    ignored = (OVERLAY / ".gitignore").read_text().split()
    assert "secrets.env" in ignored and not (OVERLAY / "secrets.env").exists()
    values = parse_env_file(OVERLAY / "secrets.env.example").values()
    assert values and all("replace-me" in value for value in values)


def judge_ingress_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Why the judge's gRPC port would be reachable from anything but writer pods."""
    judge = pod_labels(workloads(docs)["judge"])
    others = [pod_labels(d) for c, d in workloads(docs).items() if c != "writer"]
    policies = [p for p in of_kind(docs, "NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]
                and selects(p["spec"]["podSelector"], judge)]
    problems = [] if policies else ["no ingress policy selects the judge"]
    for rule in [r for p in policies for r in p["spec"].get("ingress", [])]:
        ports = {p["port"] for p in rule.get("ports", [])}
        for peer in rule.get("from", [{}]):
            if set(peer) == {"podSelector"} and not any(selects(peer["podSelector"], o)
                                                       for o in others):
                continue
            if set(peer) == {"namespaceSelector"} and ports == {"metrics"}:
                continue
            problems.append(f"peer {peer} reaches ports {sorted(ports) or 'all'}")
    return problems


def test_only_writer_pods_reach_the_judge(rendered):
    assert judge_ingress_problems(rendered) == []
    (policy,) = [p for p in of_kind(rendered, "NetworkPolicy") if "ingress" in p["spec"]]
    writer_rule = policy["spec"]["ingress"][0]
    assert selects(writer_rule["from"][0]["podSelector"], pod_labels(workloads(rendered)["writer"]))
    assert writer_rule["ports"] == [{"protocol": "TCP", "port": "grpc"}]


def test_the_ingress_check_finds_a_policy_that_lets_more_in(base):
    docs = copy.deepcopy(base)
    policy = named(docs, "NetworkPolicy", "epochlens-judge-ingress")
    policy["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {
        COMPONENT: "web"}}})
    policy["spec"]["ingress"].append({"from": [{"namespaceSelector": {"matchLabels": {}}}]})
    assert len(judge_ingress_problems(docs)) == 2


def test_judge_is_headless_and_the_writer_round_robins_over_it(rendered):
    judge = named(rendered, "Service", "epochlens-judge")
    assert judge["spec"]["clusterIP"] == "None"
    env = container(workloads(rendered)["writer"])["env"]
    names = [entry["name"] for entry in env]
    # $(POD_NAMESPACE) is expanded only from variables defined before it.
    assert names.index("POD_NAMESPACE") < names.index("EPOCHLENS_WRITER_JUDGE_ADDRESS")
    assert env[names.index("POD_NAMESPACE")]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.namespace"
    port = judge["spec"]["ports"][0]["port"]
    assert env[names.index("EPOCHLENS_WRITER_JUDGE_ADDRESS")]["value"] == \
        f"dns:///epochlens-judge.$(POD_NAMESPACE).svc:{port}"


def test_services_select_their_pods_and_name_real_ports(rendered):
    for service in of_kind(rendered, "Service"):
        matched = [d for d in workloads(rendered).values()
                   if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(d))]
        assert len(matched) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["port"] == port_named(matched[0], port["targetPort"])
        headless = service["spec"].get("clusterIP") == "None"
        assert headless == (service["metadata"]["name"] == "epochlens-judge")


def dockerfile_uid() -> int:
    match = re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert match and re.search(r"^USER epochlens$", (ROOT / "Dockerfile").read_text(), re.M)
    return int(match.group(1))


def test_pods_run_as_the_image_user_with_a_read_only_root(rendered):
    uid = dockerfile_uid()
    (account,) = of_kind(rendered, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for component, doc in workloads(rendered).items():
        spec = pod_spec(doc)
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == account["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid
        context = container(doc)["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, component
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}


def test_metrics_are_served_on_the_named_port_prometheus_scrapes(rendered):
    for component in ("writer", "judge", "query", "web"):
        doc = workloads(rendered)[component]
        env = environment(rendered, doc)
        prefix = f"EPOCHLENS_{component.upper()}_"
        assert env[prefix + "METRICS_PORT"] == str(port_named(doc, "metrics"))
        assert env[prefix + "HOST"] == env[prefix + "METRICS_HOST"] == "0.0.0.0"
        assert env[prefix + "LOG_FORMAT"] == "json"
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                               "prometheus.io/port": env[prefix + "METRICS_PORT"]}


def test_overlay_sets_namespace_image_tls_and_bounds(overlay):
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    for doc in overlay:
        assert doc["metadata"].get("namespace") == (
            None if doc["kind"] == "Namespace" else kustomization["namespace"])
    for doc in workloads(overlay).values():
        assert container(doc)["image"] == f"{image['newName']}:{image['newTag']}"
    judge = container(workloads(overlay)["judge"])
    assert "grpc" not in judge["livenessProbe"] and judge["livenessProbe"]["tcpSocket"]
    env = environment(overlay, workloads(overlay)["judge"])
    (mount,) = [m for m in judge["volumeMounts"] if m["name"] == "tls"]
    assert env["EPOCHLENS_JUDGE_TLS_CLIENT_CA_FILE"] == mount["mountPath"] + "/ca.crt"
    assert named(overlay, "HorizontalPodAutoscaler", "epochlens-judge")["spec"]["minReplicas"] == 3
    writer = environment(overlay, workloads(overlay)["writer"])
    assert writer["EPOCHLENS_WRITER_JUDGE_TLS"] == "true"
    assert writer["EPOCHLENS_WRITER_JUDGE_TLS_SERVER_NAME"] == "epochlens-judge"


def secret_values(docs: list[dict[str, Any]]) -> dict[str, str]:
    (secret,) = of_kind(docs, "Secret")
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def test_pgbouncer_urls_come_with_statement_caches_off(overlay):
    """Transaction pooling: no prepared statement kept across transactions, and WatchRun's
    LISTEN on a direct connection."""
    secrets = secret_values(overlay)
    pooled = [c for c in ("writer", "judge", "query")
              if f":{PGBOUNCER_PORT}/" in secrets[f"EPOCHLENS_{c.upper()}_DATABASE_URL"]]
    assert pooled == ["writer", "judge", "query"]
    for component in pooled:
        env = environment(overlay, workloads(overlay)[component])
        assert env[f"EPOCHLENS_{component.upper()}_DB_STATEMENT_CACHE_SIZE"] == "0"
    assert f":{PGBOUNCER_PORT}/" not in secrets["EPOCHLENS_QUERY_WATCH_LISTEN_URL"]
    assert f":{PGBOUNCER_PORT}/" not in secrets["EPOCHLENS_MIGRATE_DATABASE_URL"]


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_runs_the_same_services_with_the_same_settings(base):
    compose = compose_services()
    assert set(compose) - {"postgres"} == set(workloads(base))
    known = documented_names() | AWAITED_SETTINGS
    for component, doc in workloads(base).items():
        service_env = compose[component]["environment"]
        assert compose[component]["command"] == container(doc)["command"]
        assert sorted(set(service_env) - known) == [], component
        k8s_env = environment(base, doc)
        assert set(service_env) == set(k8s_env) - HELPER_VARIABLES - K8S_ONLY, component
        for name in [n for n in k8s_env if n.endswith(("_PORT", "_HOST", "_GRACE_S"))]:
            assert str(service_env[name]) == k8s_env[name], name


def test_compose_stop_grace_covers_the_shutdown_grace(base):
    compose = compose_services()
    for component in ("writer", "judge", "query", "web"):
        stop = compose[component]["stop_grace_period"]
        assert stop.endswith("s")
        env = {k: str(v) for k, v in compose[component]["environment"].items()}
        assert float(stop[:-1]) > shutdown_grace(component, env)


def test_kustomizations_list_every_manifest_file():
    """A manifest file no kustomization names would silently not be applied."""
    for folder in (BASE, OVERLAY):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        listed = set(kustomization.get("resources", [])) | {
            p["path"] for p in kustomization.get("patches", [])}
        files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert files <= listed, folder
        for name in files:
            assert load_documents(folder / name)


def comparable(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Resources by kind and name, Secret data decoded (kustomize wraps long base64 lines)."""
    out = {}
    for doc in copy.deepcopy(docs):
        if doc["kind"] == "Secret":
            doc["data"] = {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}
        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
def test_the_renderer_matches_kubectl_kustomize(tmp_path):
    """The stand-in renders what kubectl does (its env file from the committed template)."""
    tree = tmp_path / "k8s"
    shutil.copytree(BASE.parent, tree)
    env_file = tree / "overlays" / "example" / "secrets.env"
    shutil.copy(env_file.with_name(env_file.name + ENV_FILE_TEMPLATE_SUFFIX), env_file)
    for folder in (tree / "base", tree / "overlays" / "example"):
        built = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                               text=True, check=True, timeout=60).stdout
        real = [doc for doc in yaml.safe_load_all(built) if doc is not None]
        assert comparable(render(folder)) == comparable(real)
