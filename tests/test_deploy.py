"""deploy/: the rendered Kubernetes overlays, the autoscaling metrics, the alert-rule wrapper, the container files.

Schema validation (kubernetes-validate --strict, the CRD and adapter checks, hadolint, the compose schema) runs
in `make deploy-check`; these tests check what a schema cannot: that the pieces agree with each other and with
the code (settings, exported metric names, the TensorRT pin), and that the overlays keep their promises.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
import urllib.request
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from conftest import TRITON_METRICS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]
TRITON_RELEASE = "25.09"
TRITON_TENSORRT = "10.13.3.9"  # TensorRT in NVIDIA's 25.09 Triton/TensorRT images

# The metric contract: what the gateway (gateway/ner_gateway/observability/metrics.py) and Triton export, by name.
GATEWAY_METRICS = {"ner_requests_total", "ner_request_duration_seconds", "ner_stage_duration_seconds",
                   "ner_inflight_requests", "ner_triton_up", "ner_entities_total",
                   # model rollout: deploy/prometheus/rules/ner-rollout.yml and the dashboard's rollout row
                   "ner_model_versions", "ner_model_version_refusals_total", "ner_rollout_policy_reloads_total",
                   "ner_shadow_requests_total", "ner_shadow_entities_total", "ner_shadow_documents_total"}


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


validate = _load(K8S / "validate.py")
gen_prometheusrule = _load(K8S / "gen_prometheusrule.py")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: validate.render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def adapter_rules() -> list[dict[str, Any]]:
    (config_map,) = validate.render(K8S / "prometheus-adapter")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    return found


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    return found


def config_map(docs: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    (found,) = [d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].startswith(prefix + "-")]
    return found["data"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_overlay_renders_the_same_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert {"gpu", "cpu"} <= set(OVERLAYS)
    for name, docs in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap"
                  else d["metadata"]["name"]) for d in docs}
        assert {("Deployment", "triton"), ("Deployment", "ner-gateway"), ("Service", "triton-headless"),
                ("Service", "ner-gateway"), ("HorizontalPodAutoscaler", "triton"),
                ("HorizontalPodAutoscaler", "ner-gateway"), ("PodDisruptionBudget", "triton"),
                ("PodDisruptionBudget", "ner-gateway"), ("ServiceMonitor", "triton"),
                ("ServiceMonitor", "ner-gateway"), ("PrometheusRule", "ner-alerts")} <= kinds, name
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"ner"}, name


def test_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        triton = container(one(docs, "Deployment", "triton"), "triton")
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live", name
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready", name
        assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live", name
        ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
        assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}, name
        assert triton["readinessProbe"]["httpGet"]["port"] == "http"

        gateway = container(one(docs, "Deployment", "ner-gateway"), "gateway")
        grpc_port = {p["name"]: p["containerPort"] for p in gateway["ports"]}["grpc"]
        # Native gRPC probes (grpc.health.v1) for readiness and startup; liveness must not follow Triton.
        assert gateway["readinessProbe"]["grpc"]["port"] == grpc_port == 50051, name
        assert gateway["startupProbe"]["grpc"]["port"] == grpc_port, name
        assert "grpc" not in gateway["livenessProbe"], name


def test_pods_run_non_root_with_read_only_root_filesystem(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        for deployment in objects(docs, "Deployment"):
            spec = pod_spec(deployment)
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["runAsUser"] > 0, name
            assert spec["automountServiceAccountToken"] is False, name
            assert spec["terminationGracePeriodSeconds"] >= 30, name
            for c in spec["containers"] + spec.get("initContainers", []):
                context = c["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, (name, c["name"])
                assert context["allowPrivilegeEscalation"] is False, (name, c["name"])
                assert context["capabilities"]["drop"] == ["ALL"], (name, c["name"])
                assert "resources" in c and "requests" in c["resources"], (name, c["name"])
            for c in spec["containers"]:
                # Triton pauses in a preStop hook; the gateway drains in-process (NER_SHUTDOWN_DRAIN_S), no hook.
                assert ("lifecycle" not in c) == (c["name"] == "gateway"), (name, c["name"])
                assert c["name"] == "gateway" or c["lifecycle"]["preStop"], (name, c["name"])


def test_gpu_limits_only_in_gpu_overlays(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        gpus = {c["name"]: c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                for d in objects(docs, "Deployment") for c in pod_spec(d)["containers"]}
        if name in GPU_OVERLAYS:
            assert gpus == {"triton": "1", "gateway": None, "otel-collector": None}, name
        else:
            assert set(gpus.values()) == {None}, name
            assert "nvidia.com/gpu" not in yaml.safe_dump(docs), name


def test_topology_spread_and_disruption_budgets_select_their_pods(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        deployments = objects(docs, "Deployment")
        for deployment in deployments:
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
            spread = pod_spec(deployment)["topologySpreadConstraints"]
            assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
            assert all(selects(c["labelSelector"]["matchLabels"], labels) for c in spread)
        for pdb in objects(docs, "PodDisruptionBudget"):
            matched = [d["metadata"]["name"] for d in deployments
                       if selects(pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])]
            assert matched == [pdb["metadata"]["name"]], (name, pdb["metadata"]["name"], matched)
            hpa = one(docs, "HorizontalPodAutoscaler", pdb["metadata"]["name"])
            assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], name


def test_services_and_service_monitors_reach_their_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        services = objects(docs, "Service")
        for service in services:
            (deployment,) = [d for d in objects(docs, "Deployment")
                             if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
            port_names = {p["name"] for c in pod_spec(deployment)["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names, (name, service)
        assert one(docs, "Service", "triton-headless")["spec"]["clusterIP"] == "None"
        assert one(docs, "Service", "ner-gateway")["spec"]["type"] == "ClusterIP"
        for monitor in objects(docs, "ServiceMonitor"):
            (service,) = [s for s in services
                          if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_hpas_scale_their_deployments_on_the_adapters_metrics(
        rendered: dict[str, list[dict[str, Any]]], adapter_rules: list[dict[str, Any]]) -> None:
    exposed = {rule["name"]["as"] for rule in adapter_rules}
    for name, docs in rendered.items():
        for hpa in objects(docs, "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            assert target["kind"] == "Deployment"
            one(docs, "Deployment", target["name"])
        gateway_hpa = one(docs, "HorizontalPodAutoscaler", "ner-gateway")
        assert [m["resource"]["name"] for m in gateway_hpa["spec"]["metrics"]] == ["cpu"]
        triton_hpa = one(docs, "HorizontalPodAutoscaler", "triton")
        custom = {m["pods"]["metric"]["name"] for m in triton_hpa["spec"]["metrics"] if m["type"] == "Pods"}
        # Every custom metric the HPA asks for is one the adapter exposes, and the adapter exposes no other.
        assert custom == exposed, name
        resources = [m["resource"]["name"] for m in triton_hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert resources == ([] if name in GPU_OVERLAYS else ["cpu"]), name


def test_adapter_rules_use_only_metrics_triton_exports(adapter_rules: list[dict[str, Any]]) -> None:
    for rule in adapter_rules:
        used = set(re.findall(r"\b(?:nv|ner)_[a-z_]+\b", rule["seriesQuery"] + rule["metricsQuery"]))
        assert used and used <= TRITON_METRICS, used - TRITON_METRICS
        # Per pod: the HPA's Pods metrics are looked up by namespace and pod.
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), rule["seriesQuery"].split("{")[0].strip("'"))


def test_validator_rejects_what_kubernetes_validate_cannot_see(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu"]
    monitor = one(docs, "ServiceMonitor", "triton")
    assert validate.check(monitor, "1.32.0") == []
    typo = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "metrics", "intervall": "15s"}]}}
    assert validate.check(typo, "1.32.0") == ["unknown field spec.endpoints[0].intervall"]
    bad_duration = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "metrics", "interval": "15 s"}]}}
    assert validate.check(bad_duration, "1.32.0")
    rule = one(docs, "PrometheusRule", "ner-alerts")
    assert validate.check(rule, "1.32.0") == []
    adapter = validate.render(K8S / "prometheus-adapter")[0]
    assert validate.check(adapter, "1.32.0") == []
    broken = {**adapter, "data": {"config.yaml": "rules:\n- seriesQuery: x\n  metricQuery: y\n"}}
    assert any("metricQuery" in p for p in validate.check(broken, "1.32.0"))
    assert validate.check({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}}, "1.32.0")


def test_gateway_settings_match_the_cluster(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from ner_gateway.settings import GatewaySettings

    fields = set(GatewaySettings.model_fields)
    for name, docs in rendered.items():
        settings = config_map(docs, "ner-gateway-config")
        keys = {k.removeprefix("NER_").lower() for k in settings if k.startswith("NER_")}
        assert keys <= fields, keys - fields
        GatewaySettings(**{k.removeprefix("NER_").lower(): v for k, v in settings.items() if k.startswith("NER_")})
        deployment = one(docs, "Deployment", "ner-gateway")
        gateway = container(deployment, "gateway")
        ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
        assert int(settings["NER_PORT"]) == ports["grpc"] and int(settings["NER_METRICS_PORT"]) == ports["metrics"]
        assert settings["NER_HOST"] == "0.0.0.0"
        mounts = {m["mountPath"]: m for m in gateway["volumeMounts"]}
        assert mounts[settings["NER_MODEL_REPOSITORY"]]["readOnly"] is True
        # The Triton URL is the headless Service's cluster DNS name, on its gRPC port, as a dns:/// entry (the
        # gateway re-resolves it and balances over every address).
        headless = one(docs, "Service", "triton-headless")
        grpc_port = {p["name"]: p["port"] for p in headless["spec"]["ports"]}["grpc"]
        namespace = headless["metadata"]["namespace"]
        assert settings["NER_TRITON_URL"] == f"dns:///triton-headless.{namespace}.svc.cluster.local:{grpc_port}"
        # Shutdown: NOT_SERVING for the drain, which outlasts the readiness probe's failures (the endpoint is gone
        # before the port closes); then in-flight calls get the grace, as long as the default deadline; both fit
        # in the pod's termination grace period with a margin.
        drain, grace = float(settings["NER_SHUTDOWN_DRAIN_S"]), float(settings["NER_SHUTDOWN_GRACE_S"])
        probe = gateway["readinessProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] <= drain, name
        assert grace >= float(settings["NER_DEFAULT_TIMEOUT_S"]), name
        assert drain + grace + 5 <= pod_spec(deployment)["terminationGracePeriodSeconds"], name
        assert ("NER_TENSORRT_VERSION" in settings) == (name in GPU_OVERLAYS), name


def test_rollout_policy_reaches_running_gateways(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The rollout policy is a ConfigMap without a hash suffix (editing it must not roll the gateways), mounted as a
    directory (a subPath mount never sees an update) where NER_ROLLOUT_POLICY_FILE points; the base's is empty."""
    for name, docs in rendered.items():
        (policy,) = [d for d in objects(docs, "ConfigMap") if d["metadata"]["name"] == "ner-rollout"]
        assert list(policy["data"]) == ["policy.yaml"], name
        assert yaml.safe_load(policy["data"]["policy.yaml"]) == {"models": {}}, name
        deployment = one(docs, "Deployment", "ner-gateway")
        (volume,) = [v for v in pod_spec(deployment)["volumes"] if v.get("configMap", {}).get("name") == "ner-rollout"]
        (mount,) = [m for m in container(deployment, "gateway")["volumeMounts"] if m["name"] == volume["name"]]
        assert "subPath" not in mount and mount["readOnly"] is True, name
        path = config_map(docs, "ner-gateway-config")["NER_ROLLOUT_POLICY_FILE"]
        assert path == f"{mount['mountPath']}/policy.yaml" == "/etc/ner/rollout/policy.yaml", name
    # The format's example in the comment is a policy the same shape as the empty one's.
    text = (K8S / "base" / "gateway" / "rollout-policy.yaml").read_text()
    example = yaml.safe_load("\n".join(line.removeprefix("#")[1:] for line in text.splitlines()
                                       if line.startswith("#   ")))
    assert example == {"models": {"wnut16": {"stable": "3", "canary": {"version": "4", "share": 0.1},
                                             "shadow": {"version": "4", "share": 1.0}}}}


def test_triton_args_resolve(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        deployment = one(docs, "Deployment", "triton")
        triton = container(deployment, "triton")
        settings = config_map(docs, "triton-config")
        env = {e["name"]: e["valueFrom"] for e in triton["env"]}
        for variable in re.findall(r"\$\((\w+)\)", " ".join(triton["args"])):
            source = env[variable]
            assert "secretKeyRef" in source or source["configMapKeyRef"]["key"] in settings, (name, variable)
        assert "--model-control-mode=explicit" in triton["args"]
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        pause = int(triton["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pause + int(settings["TRITON_EXIT_TIMEOUT_S"]) < grace
        if name in GPU_OVERLAYS:
            assert settings["TRITON_EXIT_ON_ERROR"] == settings["TRITON_STRICT_READINESS"] == "true"
        else:
            assert settings["TRITON_EXIT_ON_ERROR"] == settings["TRITON_STRICT_READINESS"] == "false"
        s3 = settings["MODEL_REPOSITORY"].startswith("s3://")
        assert s3 == name.endswith("-s3"), name
        assert bool(objects(docs, "PersistentVolumeClaim")) != s3, name


def test_only_the_gateway_reaches_tritons_grpc_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        triton = one(docs, "Deployment", "triton")
        triton_labels = triton["spec"]["template"]["metadata"]["labels"]
        gateway_labels = one(docs, "Deployment", "ner-gateway")["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in objects(docs, "NetworkPolicy")
                     if selects(p["spec"]["podSelector"]["matchLabels"], triton_labels)]
        assert policy["spec"]["policyTypes"] == ["Ingress"], name
        allowed: dict[str, list[dict[str, Any]]] = {}
        for rule in policy["spec"]["ingress"]:
            assert rule["from"] and rule["ports"], name  # no rule open to every source or every port
            for port in rule["ports"]:
                allowed.setdefault(port["port"], []).extend(rule["from"])
        ports = {p["name"]: p["containerPort"] for p in container(triton, "triton")["ports"]}
        # HTTP (the admin APIs, probes) gets no rule: only the pod's own node (kubelet probes) and the pod itself.
        assert set(allowed) == {"grpc", "metrics"} and set(allowed) <= set(ports), name
        (grpc_peer,) = allowed["grpc"]
        assert set(grpc_peer) == {"podSelector"}, name  # this namespace only
        assert selects(grpc_peer["podSelector"]["matchLabels"], gateway_labels), name
        assert not selects(grpc_peer["podSelector"]["matchLabels"], triton_labels), name
        (prometheus,) = allowed["metrics"]
        assert prometheus == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}, name


def test_tritons_admin_protocols_need_the_secret_key(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from ner_gateway.triton.process import ADMIN_KEY, RESTRICTED_PROTOCOLS

    restricted = f"{','.join(RESTRICTED_PROTOCOLS)}:{ADMIN_KEY}=$(TRITON_ADMIN_KEY)"
    for name, docs in rendered.items():
        triton = container(one(docs, "Deployment", "triton"), "triton")
        assert f"--grpc-restricted-protocol={restricted}" in triton["args"], name
        assert f"--http-restricted-api={restricted}" in triton["args"], name
        env = {e["name"]: e["valueFrom"] for e in triton["env"]}
        assert env["TRITON_ADMIN_KEY"] == {"secretKeyRef": {"name": "triton-admin-key", "key": "key",
                                                            "optional": False}}, name
        assert not objects(docs, "Secret"), name  # created out of band (deploy/README.md), never committed


async def test_load_model_script_sends_the_admin_key(tiny_repository: Path) -> None:
    """deploy/k8s/load-model.sh's Python part against a real Triton whose repository API is restricted."""
    import asyncio
    import os
    import subprocess

    from ner_gateway.triton.process import EmbeddedTriton

    script = (K8S / "load-model.sh").read_text()
    program = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    triton = EmbeddedTriton(tiny_repository)
    await triton.start()
    try:
        env = {**os.environ, "TRITON_HTTP_URL": f"http://127.0.0.1:{triton.ports.http}"}

        def run(key: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-", "tiny", "1"], input=program, capture_output=True, text=True,
                                  env={**env, "TRITON_ADMIN_KEY": key}, timeout=120)

        loaded = await asyncio.to_thread(run, triton.admin_headers["triton-grpc-protocol-admin-key"])
        assert loaded.returncode == 0 and loaded.stdout.strip() == "tiny: READY versions 1", loaded.stderr
        refused = await asyncio.to_thread(run, "wrong")
        assert refused.returncode != 0 and "403" in refused.stderr
    finally:
        await triton.stop()


def test_prometheus_rule_is_generated_from_the_alert_rules() -> None:
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == gen_prometheusrule.render(), "stale: run `make prometheus-rule`"
    groups = yaml.safe_load(committed)["spec"]["groups"]
    sources = gen_prometheusrule.SOURCES
    assert [p.name for p in sources] == ["ner-alerts.yml", "ner-rollout.yml"]  # prometheus.yml's rules/*.yml
    assert groups and groups == [g for p in sources for g in yaml.safe_load(p.read_text())["groups"]]
    with pytest.raises(ValueError, match="repeat"):
        gen_prometheusrule.load_groups([sources[0], sources[0]])


def test_alert_rules_select_the_scrape_jobs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    wanted = set(re.findall(r'job="([^"]+)"', "\n".join(p.read_text() for p in gen_prometheusrule.SOURCES)))
    for name, docs in rendered.items():
        jobs = set()
        for monitor in objects(docs, "ServiceMonitor"):
            (service,) = [s for s in objects(docs, "Service")
                          if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            jobs.add(service["metadata"]["labels"][monitor["spec"]["jobLabel"]])
        assert wanted <= jobs, (name, wanted - jobs)
    # compose.yaml runs deploy/prometheus/prometheus.yml as is: its targets must be compose services.
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    targets = {c["job_name"]: t for c in prometheus["scrape_configs"]
               for s in c["static_configs"] for t in s["targets"]}
    assert wanted <= set(targets)
    assert {t.split(":")[0] for t in targets.values()} <= set(services)
    assert targets["ner-gateway"] == f"ner-gateway:{services['ner-gateway']['environment']['NER_METRICS_PORT']}"
    alertmanagers = [t for a in prometheus["alerting"]["alertmanagers"]
                     for s in a["static_configs"] for t in s["targets"]]
    assert {t.split(":")[0] for t in alertmanagers} <= set(services)


def test_one_triton_release_and_tensorrt_everywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"tensorrt=={TRITON_TENSORRT}" in pyproject["project"]["optional-dependencies"]["tensorrt"]
    triton_file = (DOCKER / "triton.Dockerfile").read_text()
    builder_file = (DOCKER / "builder.Dockerfile").read_text()
    assert f"ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3" in triton_file
    assert f"ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:{TRITON_RELEASE}-py3" in builder_file
    assert f"ARG TENSORRT_VERSION={TRITON_TENSORRT}" in builder_file
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert {i["name"]: i["newTag"] for i in kustomization["images"]}["triton-ner/triton"] == TRITON_RELEASE
    for name in GPU_OVERLAYS:
        assert config_map(rendered[name], "ner-gateway-config")["NER_TENSORRT_VERSION"] == TRITON_TENSORRT
    compose_gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    assert compose_gpu["services"]["ner-gateway"]["environment"]["NER_TENSORRT_VERSION"] == TRITON_TENSORRT


def _stages(path: Path) -> list[list[dict[str, Any]]]:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(path))
    stages: list[list[dict[str, Any]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_gateway_image_is_multi_stage_slim_non_root_without_torch() -> None:
    build, final = _stages(DOCKER / "gateway.Dockerfile")
    text = (DOCKER / "gateway.Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11" in text and "-slim" in text
    assert all(v == "${PYTHON_IMAGE}" or v.startswith("${PYTHON_IMAGE} ") for v in
               _values(build, "FROM") + _values(final, "FROM"))
    # The build stage installs the project without extras; the final stage only copies its venv.
    (install,) = [v for v in _values(build, "RUN") if "pip install" in v]
    assert re.search(r"pip install \.(\s|$)", install) and "[" not in install
    assert not [v for v in _values(final, "RUN") if re.search(r"pip|apt-get|apk|gcc|make", v)]
    assert _values(final, "COPY") == ["--from=build /opt/venv /opt/venv"]
    user = _values(final, "USER")[-1]
    assert user.split(":")[0] not in {"0", "root"} and user.split(":")[0].isdigit()
    assert not [v for stage in (build, final) for i in stage if "torch" in (v := i["value"].lower())]
    assert _values(final, "ENTRYPOINT") == ['["ner-gateway"]']


def test_other_images_pin_their_base_and_run_as_intended() -> None:
    (triton,) = _stages(DOCKER / "triton.Dockerfile")
    assert _values(triton, "USER") == ["1000:1000"]  # the uid the Triton Deployment runs as
    *_, builder = _stages(DOCKER / "builder.Dockerfile")
    assert _values(builder, "ENTRYPOINT") == ['["ner-builder"]']
    for path in DOCKER.glob("*.Dockerfile"):
        images = re.findall(r"^ARG \w+_IMAGE=(\S+)$", path.read_text(), re.MULTILINE)
        assert images, path.name
        for image in images:
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), (path.name, image)


def test_docker_ignore_files_let_the_copied_sources_through() -> None:
    for path in DOCKER.glob("*.Dockerfile"):
        copies = [v for stage in _stages(path) for v in _values(stage, "COPY") if not v.startswith("--from")]
        if not copies:
            continue
        allowed = {line[1:].rstrip("/") for line in (path.parent / (path.name + ".dockerignore")).read_text()
                   .splitlines() if line.startswith("!")}
        sources = {src.rstrip("/") for v in copies for src in v.split()[:-1]}
        assert sources <= allowed, (path.name, sources - allowed)


def test_gateway_runtime_installs_no_torch() -> None:
    """The dependency closure of `pip install .` (no extras), read from the installed metadata."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    queue: list[tuple[str, frozenset[str]]] = [("triton-ner", frozenset())]
    while queue:
        name, extras = queue.pop()
        if (key := f"{name}[{','.join(sorted(extras))}]") in seen:
            continue
        seen.add(key)
        for spec in metadata.requires(name) or []:
            requirement = Requirement(spec)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in {"", *extras}):
                queue.append((requirement.name.lower().replace("_", "-"), frozenset(requirement.extras)))
    names = {key.split("[")[0] for key in seen}
    assert "tritonclient" in names and "grpcio" in names
    assert not names & {"torch", "transformers", "onnx", "onnxruntime", "nvidia-pytriton", "tensorrt",
                        "tensorrt-rtx", "grpcio-tools", "setuptools"}, names


def test_gateway_exports_the_contract_metrics() -> None:
    """The names the alert rules and dashboards rely on, from the gateway's own metrics registry."""
    from prometheus_client import generate_latest

    from ner_gateway.observability.metrics import GatewayMetrics

    text = generate_latest(GatewayMetrics().registry).decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    assert GATEWAY_METRICS <= exported, GATEWAY_METRICS - exported


def test_the_autoscaler_metrics_exist_on_a_real_triton(start_gateway, tiny_repository: Path) -> None:
    """The series the adapter rules read, scraped from a real Triton after a real request through the gateway."""
    from ner_gateway.net import free_port
    from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

    metrics_port = free_port()
    env = {"NER_TRITON_GRPC_PORT": str(free_port()), "NER_TRITON_HTTP_PORT": str(free_port()),
           "NER_TRITON_METRICS_PORT": str(metrics_port)}
    gateway = start_gateway(tiny_repository, env=env)
    with gateway.channel() as channel:
        request = ner_pb2.RecognizeRequest(texts=["Angela Merkel visited Paris"])
        ner_pb2_grpc.NerServiceStub(channel).Recognize(request, timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    series = {line.split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert TRITON_METRICS <= series, TRITON_METRICS - series
    # Labelled per model and version, as the adapter's sum by (pod) expects.
    assert re.search(r'^nv_inference_count\{model="tiny",version="1"\} [1-9]', text, re.MULTILINE), text[:2000]


def collector_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


def test_collectors_export_both_services_spans_to_a_tracing_backend() -> None:
    """Compose's and Kubernetes' collector configs are one file: OTLP in over gRPC (the gateway) and HTTP (Triton),
    one traces pipeline, out to the tracing backend's OTLP endpoint (TRACES_ENDPOINT, a documented placeholder)."""
    compose = ROOT / "deploy" / "docker" / "otel-collector.yaml"
    k8s = K8S / "components" / "tracing" / "otel-collector.yaml"
    assert compose.read_text() == k8s.read_text()
    config = collector_config(compose)
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    (pipeline,) = config["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    backends = [e for e in pipeline["exporters"] if e.split("/")[0] in ("otlp", "otlphttp")]
    assert backends and all("${env:TRACES_ENDPOINT" in config["exporters"][e]["endpoint"] for e in backends)


def test_both_services_send_their_spans_to_the_collector(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        service = {p["name"]: p["port"] for p in one(docs, "Service", "otel-collector")["spec"]["ports"]}
        collector = one(docs, "Deployment", "otel-collector")
        assert selects(one(docs, "Service", "otel-collector")["spec"]["selector"],
                       collector["spec"]["template"]["metadata"]["labels"]), name
        assert config_map(docs, "otel-collector-env")["TRACES_ENDPOINT"].startswith("http"), name
        gateway = config_map(docs, "ner-gateway-config")
        assert gateway["OTEL_TRACES_EXPORTER"] == "otlp" and gateway["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc", name
        assert gateway["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{service['otlp-grpc']}", name
        args = container(one(docs, "Deployment", "triton"), "triton")["args"]
        assert "--trace-config=mode=opentelemetry" in args, name
        assert f"--trace-config=opentelemetry,url=otel-collector:{service['otlp-http']}/v1/traces" in args, name
