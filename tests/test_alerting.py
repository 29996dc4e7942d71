"""Traces that feed monitoring and alerting, for real: Debian's Prometheus (exemplar storage on, the project's rule
files loaded) scrapes a gateway and the Triton behind it; the project's Alertmanager config sends to a webhook sink
here; the rotel collector forwards the gateway's and Triton's spans to a trace sink here.

Prometheus runs the project's rules with every duration divided by ``TIME_SCALE`` (5m -> 5s, 1h -> 1m, ``for: 2m``
-> 2s), so that an incident fires and resolves in seconds; ``promtool test rules`` checks them at full scale
(test_observability_config.py). The model is the tiny one with a switchable delay in its Triton model (a file next
to its model.py), so a latency breach is a real slow model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from otlp import TraceSink, start_rotel
from test_observability_config import as_promql, dashboard_exprs, dashboard_json, dashboard_variables

from ner_gateway.net import free_port, free_ports
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.triton.process import EmbeddedTriton, TritonPorts

from conftest import TINY_MODEL, GatewayProcess, poll_until, stop_process

pytestmark = pytest.mark.skipif(not shutil.which("prometheus") or not shutil.which("prometheus-alertmanager"),
                                reason="Debian's prometheus and prometheus-alertmanager (.ci/run installs them)")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
TIME_SCALE = 60
DELAY_FILE = "delay_s"
TEXT = "Angela Merkel visited Paris"


# --- the pieces ---------------------------------------------------------------------------------------------------


def scaled(text: str, factor: int = TIME_SCALE) -> str:
    """Rule text with every PromQL range, offset and ``for:`` duration divided by ``factor`` (at least 1 s)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

    def seconds(duration: str) -> str:
        total = sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhdw])", duration))
        return f"{max(1, total // factor)}s"

    text = re.sub(r"\[(\w+)\]", lambda m: f"[{seconds(m.group(1))}]", text)
    text = re.sub(r"\boffset (\w+)", lambda m: f"offset {seconds(m.group(1))}", text)
    return re.sub(r"(\bfor: )(\w+)", lambda m: m.group(1) + seconds(m.group(2)), text)


def test_scaled_rules_divide_every_duration() -> None:
    assert scaled("rate(x[5m]) > 1 and increase(y[1d] offset 1h)\nfor: 2m") == (
        "rate(x[5s]) > 1 and increase(y[1440s] offset 60s)\nfor: 2s")


class WebhookSink(ThreadingHTTPServer):
    """Alertmanager's webhook receiver: keeps every notification (receiver, status, alerts)."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with sink.lock:
                    sink.notifications.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def alerts(self, name: str, status: str) -> list[tuple[str, dict[str, Any]]]:
        """(receiver path, alert) for every ``name`` alert notified with ``status`` (firing or resolved)."""
        with self.lock:
            return [(n["path"], a) for n in self.notifications for a in n["alerts"]
                    if a["labels"]["alertname"] == name and a["status"] == status]


@dataclass
class Prometheus:
    port: int

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]  # type: ignore[no-any-return]

    def exemplars(self, expr: str, since_s: float = 600) -> list[dict[str, Any]]:
        """(series labels, exemplar) pairs of ``expr`` over the last ``since_s`` seconds."""
        now = time.time()
        data = self.get("/api/v1/query_exemplars", query=expr, start=str(now - since_s), end=str(now + 1))
        return [{"series": s["seriesLabels"], **e} for s in data for e in s["exemplars"]]


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    def ready() -> bool:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    poll_until(ready, timeout_s, url)


@dataclass
class Stack:
    gateway: GatewayProcess
    triton_ports: TritonPorts
    repository: Path
    prometheus: Prometheus
    webhook: WebhookSink
    traces: TraceSink
    tritons: list[EmbeddedTriton] = field(default_factory=list)

    def set_delay(self, seconds: float) -> None:
        (self.repository / TINY_MODEL / "1" / DELAY_FILE).write_text(str(seconds))

    def recognize(self, count: int, clients: int = 4, timeout_s: float = 30) -> list[grpc.StatusCode]:
        """``count`` Recognize calls from ``clients`` threads; their codes."""

        def call(_: int) -> grpc.StatusCode:
            try:
                self.stub.Recognize(ner_pb2.RecognizeRequest(texts=[TEXT]), timeout=timeout_s)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()  # type: ignore[no-any-return]

        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(call, range(count)))

    @property
    def stub(self) -> ner_pb2_grpc.NerServiceStub:
        return ner_pb2_grpc.NerServiceStub(self.channel)

    @property
    def channel(self) -> grpc.Channel:
        if not hasattr(self, "_channel"):
            self._channel = self.gateway.channel()
        return self._channel


def delayed_repository(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose model sleeps for the seconds in its ``delay_s`` file on every execute (0 now)."""
    shutil.copytree(source, target)
    model_py = target / TINY_MODEL / "1" / "model.py"
    code = model_py.read_text()
    hook = "    def execute(self, requests: list[Any]) -> list[Any]:\n"
    assert hook in code
    delay = ("        import pathlib, time  # test_alerting: an injected, switchable delay\n"
             f"        time.sleep(float(pathlib.Path(__file__).with_name({DELAY_FILE!r}).read_text() or 0))\n")
    model_py.write_text(code.replace(hook, hook + delay))
    (target / TINY_MODEL / "1" / DELAY_FILE).write_text("0")
    return target


def alertmanager_config(receiver_url: str) -> dict[str, Any]:
    """The project's Alertmanager config (routes, grouping, inhibitions) with every receiver a webhook to the sink
    (path = the receiver's name) and its waits cut to a second."""
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    config["global"] = {"resolve_timeout": "1m"}
    config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    config["receivers"] = [{"name": r["name"], "webhook_configs": [{"url": f"{receiver_url}/{r['name']}",
                                                                    "send_resolved": True}]}
                           for r in config["receivers"]]
    return config


def prometheus_config(rules: Path, alertmanager_port: int, gateway_metrics: int, triton_metrics: int) -> dict[str, Any]:
    """The project's Prometheus config (its jobs, rules and Alertmanager) pointed at the processes here, scraping
    and evaluating every second. The targets carry namespace and pod labels, as prometheus-operator's do."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules / "*.yml")]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]
    ports = {"ner-gateway": gateway_metrics, "triton": triton_metrics}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"],
                                  "labels": {"namespace": "ner", "pod": f"{job['job_name']}-0"}}]
    return config


# --- the stack, started once for the module -----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def stack(start_gateway, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("alerting")
    processes: list[subprocess.Popen[bytes]] = []
    traces = TraceSink()
    traces.server.start()
    webhook = WebhookSink()
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    tritons: list[EmbeddedTriton] = []
    try:
        otlp_grpc, otlp_http = free_ports(2)
        processes.append(start_rotel(otlp_grpc, otlp_http, traces.port, work))
        repository = delayed_repository(tiny_repository, work / "model_repository")
        triton_ports = TritonPorts(*free_ports(3))
        triton = EmbeddedTriton(repository, ports=triton_ports,
                                trace_endpoint=f"http://127.0.0.1:{otlp_http}/v1/traces")
        await triton.start()
        tritons.append(triton)
        gateway_metrics = free_port()
        gateway = start_gateway(repository, env={
            "NER_TRITON_URL": triton.grpc_url, "NER_METRICS_PORT": str(gateway_metrics),
            "NER_HEALTH_CHECK_INTERVAL_S": "0.5",
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_grpc}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        })

        alertmanager_port = free_port()
        (work / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(
            f"http://127.0.0.1:{webhook.server_address[1]}")))
        log = work / "alertmanager.log"
        processes.append(subprocess.Popen(
            ["prometheus-alertmanager", f"--config.file={work / 'alertmanager.yml'}",
             f"--storage.path={work / 'alertmanager-data'}", f"--web.listen-address=127.0.0.1:{alertmanager_port}",
             "--cluster.listen-address="], stdout=log.open("wb"), stderr=subprocess.STDOUT))
        wait_ready(f"http://127.0.0.1:{alertmanager_port}/-/ready", processes[-1], log)

        rules = work / "rules"
        rules.mkdir()
        for rule_file in (DEPLOY / "prometheus" / "rules").glob("*.yml"):
            (rules / rule_file.name).write_text(scaled(rule_file.read_text()))
        prometheus_port = free_port()
        (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(
            rules, alertmanager_port, gateway_metrics, triton_ports.metrics)))
        log = work / "prometheus.log"
        processes.append(subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--enable-feature=exemplar-storage"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT))
        wait_ready(f"http://127.0.0.1:{prometheus_port}/-/ready", processes[-1], log)
        prometheus = Prometheus(prometheus_port)
        poll_until(lambda: len(prometheus.query("up == 1")) == 2, 30, "both targets scraped")
        yield Stack(gateway, triton_ports, repository, prometheus, webhook, traces, tritons)
    finally:
        for process in reversed(processes):
            stop_process(process)
        for triton in tritons:
            await triton.stop()
        webhook.shutdown()
        traces.server.stop(0)


# --- the tests -----------------------------------------------------------------------------------------------------


def spans_of(traces: TraceSink, trace_ids: set[str]) -> dict[str, list[tuple[str, Any]]]:
    found: dict[str, list[tuple[str, Any]]] = {t: [] for t in trace_ids}
    for service, span in traces.snapshot():
        found.get(span.trace_id.hex(), []).append((service, span))
    return found


def test_latency_exemplars_lead_to_the_traces_the_collector_received(stack: Stack) -> None:
    assert set(stack.recognize(20)) == {grpc.StatusCode.OK}
    query = f'ner_request_duration_seconds_bucket{{method="Recognize",model="{TINY_MODEL}"}}'
    exemplars = poll_until(lambda: stack.prometheus.exemplars(query), 30, "exemplars in Prometheus")
    trace_ids = {e["labels"]["trace_id"] for e in exemplars}
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in trace_ids) and all(
        set(e["labels"]) == {"trace_id", "span_id"} for e in exemplars)  # ids only, no text or token

    def traced() -> tuple[dict[str, list[tuple[str, Any]]], dict[str, list[tuple[str, Any]]]] | None:
        """The exemplars' traces once complete and Triton's spans of their calls arrived: a request's
        ``triton.infer`` span links to its shared ``triton.call`` span, whose trace (its first request's) holds
        Triton's own spans."""
        found = spans_of(stack.traces, trace_ids)
        complete = all(any(s.name == "/ner.v1.NerService/Recognize" for _, s in spans) for spans in found.values())
        calls = {link.trace_id.hex() for spans in found.values() for _, s in spans if s.name == "triton.infer"
                 for link in s.links}
        served = spans_of(stack.traces, calls)
        tritons = [any(svc == "triton" for svc, _ in spans) for spans in served.values()]
        return (found, served) if complete and any(tritons) else None

    found, served = poll_until(traced, 30, "the exemplars' traces at the collector, and Triton's spans of their calls")
    for exemplar in exemplars:
        spans = {span.span_id.hex(): (service, span) for service, span in found[exemplar["labels"]["trace_id"]]}
        service, server = spans[exemplar["labels"]["span_id"]]  # the exemplar names the RPC's own span
        assert (service, server.name) == ("ner-gateway", "/ner.v1.NerService/Recognize")
    gateway_stages = {span.name for spans in found.values() for svc, span in spans if svc == "ner-gateway"}
    assert {"tokenize", "triton.infer", "decode"} <= gateway_stages
    # The shared calls' spans are in their first request's trace, which the links lead to.
    assert any(span.name == "triton.call" for spans in served.values() for _, span in spans)
    # The stage histograms carry exemplars too.
    stage = f'ner_stage_duration_seconds_bucket{{stage="infer",model="{TINY_MODEL}"}}'
    assert {e["labels"]["trace_id"] for e in stack.prometheus.exemplars(stage)} & set(found)


def selectors(node: Any) -> Iterator[tuple[str, set[str], set[str]]]:
    """(metric name, label names it matches on, label names an enclosing aggregation groups by) of every vector
    selector in a parsed PromQL expression."""
    import promql_parser

    def walk(node: Any, grouping: set[str]) -> Iterator[tuple[str, set[str], set[str]]]:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            yield node.name, matchers, grouping
            return
        if isinstance(node, promql_parser.AggregateExpr):
            modifier = node.modifier
            inner = set(modifier.labels) if modifier is not None and modifier.type == promql_parser.AggModifierType.By \
                else set()
            yield from walk(node.expr, inner)
            return
        for child in ("expr", "lhs", "rhs", "vector_selector"):
            if hasattr(node, child) and getattr(node, child) is not None:
                yield from walk(getattr(node, child), grouping)
        for arg in getattr(node, "args", None) or []:
            yield from walk(arg, grouping)

    yield from walk(node, set())


def project_queries() -> dict[str, str]:
    """Every PromQL query the project ships: rules, dashboard (variables filled in), autoscaler adapter rules."""
    queries = {}
    for rule_file in (DEPLOY / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(rule_file.read_text())["groups"]:
            for rule in group["rules"]:
                queries[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
                if "traces" in rule.get("annotations", {}):
                    queries[f"exemplars of {rule['alert']}"] = re.sub(r"\{\{[^}]*\}\}", "x",
                                                                       rule["annotations"]["traces"])
    variables = dashboard_variables(dashboard_json())
    for index, expr in enumerate(dashboard_exprs()):
        queries[f"dashboard query {index}"] = as_promql(expr, variables)
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "adapter-rules.yaml").read_text())
    for index, rule in enumerate(yaml.safe_load(adapter["data"]["config.yaml"])["rules"]):
        queries[f"adapter seriesQuery {index}"] = rule["seriesQuery"]
        queries[f"adapter metricsQuery {index}"] = (rule["metricsQuery"].replace("<<.GroupBy>>", "namespace, pod")
                                                    .replace("<<.LabelMatchers>>", 'namespace="ner"'))
    return queries


def _rollout_only() -> dict[str, set[str]]:
    """Series that exist only during a model rollout (a shadow policy, a refused version; tests/test_rollout.py makes
    each on a live gateway), by name: their instruments' label names."""
    from ner_gateway.observability.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    return {f"{m._name}_total": set(m._labelnames) for m in (  # type: ignore[attr-defined]
        metrics.shadow_requests, metrics.shadow_entities, metrics.shadow_documents, metrics.version_refusals)}


ROLLOUT_ONLY = _rollout_only()


def test_every_series_the_rules_dashboard_and_adapter_query_exists(stack: Stack) -> None:
    """A rule on a misspelt metric or label never fires: every selector of every shipped query must find series
    here, with every label it matches on or groups by (recording rules' own outputs: defined by a rule)."""
    import promql_parser

    assert set(stack.recognize(4)) == {grpc.StatusCode.OK}
    queries = project_queries()
    recorded = {q.split(" ", 1)[1] for q in queries if q.startswith("rule ") and ":" in q}
    missing = []
    checked = set()
    for where, query in queries.items():
        for name, matchers, grouping in selectors(promql_parser.parse(query)):
            if name in ("ALERTS",) or ":" in name:
                assert name == "ALERTS" or name in recorded, f"{where}: {name} is recorded by no rule"
                continue
            if name in ROLLOUT_ONLY:  # no series without a rollout: the instrument's labels, and Prometheus' own
                series, labels = [{}], ROLLOUT_ONLY[name] | {"job", "instance", "__name__"}
            else:
                series = stack.prometheus.get("/api/v1/series", **{"match[]": name})
                labels = set().union(*(s.keys() for s in series)) if series else set()
            absent = (matchers | grouping) - labels
            if not series or absent:
                missing.append((where, name, sorted(absent) if series else "no series"))
            checked.add(name)
    assert not missing, missing
    assert {"ner_requests_total", "ner_request_duration_seconds_bucket", "ner_refused_requests_total",
            "nv_inference_queue_duration_us", "up"} <= checked


def test_the_series_check_catches_a_misspelt_metric_or_label(stack: Stack) -> None:
    import promql_parser

    for query in ('rate(ner_request_total[5m])', 'sum by (modle) (rate(ner_requests_total[5m]))',
                  'ner_triton_up{instance!="", job="ner-gateway", pod=~".+", shard="1"}'):
        problems = []
        for name, matchers, grouping in selectors(promql_parser.parse(query)):
            series = stack.prometheus.get("/api/v1/series", **{"match[]": name})
            labels = set().union(*(s.keys() for s in series)) if series else set()
            if not series or (matchers | grouping) - labels:
                problems.append(name)
        assert problems, query


def alert_notified(stack: Stack, name: str, status: str, timeout_s: float) -> dict[str, Any]:
    found = poll_until(lambda: stack.webhook.alerts(name, status), timeout_s, f"{name} {status} at the receiver")
    return found[-1][1]  # type: ignore[no-any-return]


def assert_leads_to_traces(stack: Stack, alert: dict[str, Any], service_span: str) -> set[str]:
    """The alert's ``traces`` annotation is a query whose exemplars are trace ids the collector received."""
    query = alert["annotations"]["traces"]
    exemplars = poll_until(lambda: stack.prometheus.exemplars(query, since_s=120), 30, f"exemplars of {query}")
    trace_ids = {e["labels"]["trace_id"] for e in exemplars}
    found = poll_until(lambda: {t for t, spans in spans_of(stack.traces, trace_ids).items()
                                if any(s.name == service_span for _, s in spans)}, 30, "their traces")
    return found  # type: ignore[no-any-return]


def test_a_slow_model_fires_the_latency_alert_with_its_slow_traces_then_it_resolves(stack: Stack) -> None:
    stack.set_delay(0.7)
    try:
        started = time.time()
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                stack.recognize(8, clients=8)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            alert = alert_notified(stack, "NerLatencyBudgetFastBurn", "firing", 120)
        finally:
            stop.set()
            worker.join()
    finally:
        stack.set_delay(0)
    assert alert["labels"]["model"] == TINY_MODEL and alert["labels"]["severity"] == "critical"
    assert "deploy/prometheus/README.md#nerlatencybudgetburn" in alert["annotations"]["runbook"]
    slow = assert_leads_to_traces(stack, alert, "/ner.v1.NerService/Recognize")
    exemplars = stack.prometheus.exemplars(alert["annotations"]["traces"], since_s=time.time() - started)
    assert any(float(e["value"]) >= 0.7 and e["labels"]["trace_id"] in slow for e in exemplars)  # slow calls
    # The incident ends (the model is fast again): the alert resolves.
    stop_resolving = threading.Event()
    fast = threading.Thread(target=lambda: [stack.recognize(4) for _ in iter(stop_resolving.is_set, True)],
                            daemon=True)
    fast.start()
    try:
        alert_notified(stack, "NerLatencyBudgetFastBurn", "resolved", 120)
    finally:
        stop_resolving.set()
        fast.join()


async def test_triton_killed_fires_its_alerts_with_the_failed_calls_traces_then_they_resolve(stack: Stack) -> None:
    await stack.tritons[0].stop()  # Triton gone: the gateway answers UNAVAILABLE
    stop = threading.Event()
    codes: list[grpc.StatusCode] = []
    worker = threading.Thread(target=lambda: [codes.extend(stack.recognize(4, timeout_s=5))
                                              for _ in iter(stop.is_set, True)], daemon=True)
    worker.start()
    try:
        down = alert_notified(stack, "NerTritonDown", "firing", 120)
        errors = alert_notified(stack, "NerHighErrorRatio", "firing", 120)
    finally:
        stop.set()
        worker.join()
    assert grpc.StatusCode.UNAVAILABLE in codes
    assert down["labels"]["severity"] == "critical" and "#nertritondown" in down["annotations"]["runbook"]
    assert errors["labels"]["model"] == TINY_MODEL and "#nerhigherrorratio" in errors["annotations"]["runbook"]
    assert_leads_to_traces(stack, errors, "/ner.v1.NerService/Recognize")  # the failed calls' traces
    # Triton back on its ports: the alerts resolve.
    triton = EmbeddedTriton(stack.repository, ports=stack.triton_ports)
    await triton.start()
    stack.tritons.append(triton)
    stop = threading.Event()
    worker = threading.Thread(target=lambda: [stack.recognize(4, timeout_s=5) for _ in iter(stop.is_set, True)],
                              daemon=True)
    worker.start()
    try:
        alert_notified(stack, "NerTritonDown", "resolved", 120)
        alert_notified(stack, "NerHighErrorRatio", "resolved", 120)
    finally:
        stop.set()
        worker.join()
