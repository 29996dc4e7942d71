"""deploy/ observability config: alert rules (promtool), Prometheus and Alertmanager configs, Grafana dashboard.

promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager` packages (.ci/run installs
them); these tests fail, not skip, without them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import TRITON_METRICS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Every rule file prometheus.yml loads (`rules/*.yml`), each with its promtool unit tests beside the rules directory.
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = [DEPLOY / "prometheus" / "tests" / f"{path.stem}.test.yml" for path in RULE_FILES]
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_README = DEPLOY / "prometheus" / "README.md"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "ner-dashboard.json"

# Grafana's variables and what stands in for them when a dashboard query is checked as PromQL.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
INSTALL_HINT = "apt-get install prometheus prometheus-alertmanager (.ci/run does this)"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)


def rule_names(kind: str, path: Path | None = None) -> list[str]:
    """Names of the `- alert:` or `- record:` rules of one rule file (default: of all), in order."""
    return [name for file in ([path] if path else RULE_FILES)
            for name in re.findall(rf"^\s*- {kind}: (\S+)$", file.read_text(), flags=re.MULTILINE)]


def alert_blocks() -> dict[str, str]:
    blocks = {}
    for file in RULE_FILES:
        text = file.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*- alert: (\S+)$", text, flags=re.MULTILINE)]
        ends = [s for s, _ in starts[1:]] + [len(text)]
        blocks |= {name: text[start:end] for (start, name), end in zip(starts, ends, strict=True)}
    return blocks


def gateway_series() -> set[str]:
    """Every series name the real gateway exposes (its own registry, no scrape needed)."""
    from ner_gateway.observability.metrics import GatewayMetrics

    names = set()
    for family in GatewayMetrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[family.type]
        names |= {family.name + s for s in suffixes}
    return names


# --- alert rules ---------------------------------------------------------------------------------


def test_rule_files_and_their_tests() -> None:
    assert [p.name for p in RULE_FILES] == ["ner-alerts.yml", "ner-rollout.yml"]
    assert sorted((DEPLOY / "prometheus" / "tests").glob("*.yml")) == RULE_TESTS
    for path, tests in zip(RULE_FILES, RULE_TESTS, strict=True):
        assert yaml.safe_load(tests.read_text())["rule_files"] == [f"../rules/{path.name}"]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_pass_promtool_check(path: Path) -> None:
    result = run(tool("promtool"), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(rule_names("alert", path)) + len(rule_names("record", path))
    assert f"SUCCESS: {count} rules found" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(path: Path) -> None:
    result = run(tool("promtool"), "test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "FAILED" not in result.stdout + result.stderr


@pytest.mark.parametrize(("path", "tests"), list(zip(RULE_FILES, RULE_TESTS, strict=True)), ids=lambda p: p.name)
def test_every_alert_has_a_firing_and_a_quiet_case(path: Path, tests: Path) -> None:
    alerts = set(rule_names("alert", path))
    assert alerts, path.name
    cases = re.findall(r"alertname: (\S+)\n\s+exp_alerts:(.*)\n(\s+- exp_labels:)?", tests.read_text())
    firing = {name for name, inline, labels in cases if labels and not inline.strip()}
    quiet = {name for name, inline, _ in cases if inline.strip() == "[]"}
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a non-firing case"
    assert {name for name, _, _ in cases} <= alerts, "tests of alerts that do not exist"


def test_the_alerts() -> None:
    assert set(rule_names("alert")) >= {
        "NerHighErrorRatio", "NerLatencyBudgetFastBurn", "NerLatencyBudgetSlowBurn", "NerTritonDown",
        "NerTritonNotReady", "NerTritonSaturated", "NerNoTraffic", "NerEntityLabelMixDrift",
        "NerShadowCandidateDisagrees", "NerRolloutPolicyInvalid", "NerModelVersionRefused"}
    assert len(set(rule_names("alert"))) == len(rule_names("alert"))


@pytest.mark.parametrize("name", rule_names("alert"))
def test_alert_has_severity_summary_description_and_runbook(name: str) -> None:
    block = alert_blocks()[name]
    assert re.search(r"^\s+severity: (critical|warning)$", block, flags=re.MULTILINE)
    for annotation in ("summary", "description", "runbook"):
        assert re.search(rf"^\s+{annotation}: \S", block, flags=re.MULTILINE), annotation
    anchors = re.findall(r"deploy/prometheus/README\.md#([a-z0-9-]+)", block)
    assert anchors, "the runbook hint names its README section"
    headings = re.findall(r"^#+ (.+)$", PROMETHEUS_README.read_text(), flags=re.MULTILINE)
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    assert set(anchors) <= slugs


def test_rules_and_dashboard_use_only_exposed_metrics() -> None:
    exposed = gateway_series() | TRITON_METRICS
    rules = "\n".join(re.sub(r"^\s*#.*$", "", path.read_text(), flags=re.MULTILINE)  # expressions and annotations
                      for path in RULE_FILES)
    used = set(re.findall(r"\b(?:ner|nv)_[a-z0-9_]+", rules + "\n".join(dashboard_exprs())))
    assert used - exposed == set()
    assert {"ner_requests_total", "ner_request_duration_seconds_bucket", "ner_triton_up",
            "ner_entities_total", "ner_model_versions", "ner_model_version_refusals_total",
            "ner_rollout_policy_reloads_total", "ner_shadow_requests_total", "ner_shadow_entities_total",
            "ner_shadow_documents_total"} <= used


# --- Prometheus and Alertmanager configs -----------------------------------------------------------


def test_prometheus_config_passes_promtool_check() -> None:
    result = run(tool("promtool"), "check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file syntax" in result.stdout
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout  # rules/*.yml, checked with the config
    for path in RULE_FILES:
        assert f"SUCCESS: {len(rule_names('alert', path)) + len(rule_names('record', path))} rules found" \
            in result.stdout, path.name
    text = PROMETHEUS_CONFIG.read_text()
    assert "job_name: ner-gateway" in text and "job_name: triton" in text


def test_alertmanager_config_passes_amtool_check() -> None:
    result = run(tool("amtool"), "check-config", ALERTMANAGER_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "2 receivers" in result.stdout


@pytest.mark.parametrize(("labels", "receiver"), [
    (("severity=critical", "alertname=NerTritonDown"), "ner-pager"),
    (("severity=warning", "alertname=NerEntityLabelMixDrift", "model=wnut16"), "ner-tickets"),
    (("alertname=Watchdog",), "ner-tickets"),
])
def test_alertmanager_routes_by_severity(labels: tuple[str, ...], receiver: str) -> None:
    result = run(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
                 f"--verify.receivers={receiver}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


# --- Grafana dashboard -----------------------------------------------------------------------------


def dashboard_json() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in all_panels(dashboard_json()) for t in p.get("targets", [])]


def as_promql(expr: str, variables: dict[str, str]) -> str:
    """A dashboard query with its Grafana variables ($x, ${x}, ${x:fmt}, [[x]]) replaced by concrete values."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in variables:
            raise KeyError(f"unknown dashboard variable {name!r} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Template variables of the dashboard; a query variable stands for a regex matching any value."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        values[variable["name"]] = ".+" if variable["type"] == "query" else variable["name"]
    return values


def check_as_rules(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))  # JSON is YAML
    return run(tool("promtool"), "check", "rules", rule_file)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    dashboard = dashboard_json()
    variables = dashboard_variables(dashboard)
    exprs = [as_promql(e, variables) for e in dashboard_exprs()]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(<selector>, label): the selector must be PromQL
            selector = re.fullmatch(r"label_values\((.+), *\w+\)", variable["query"]["query"])
            assert selector, variable["query"]
            exprs.append(selector.group(1))
    assert len(exprs) >= 25
    assert not [e for e in exprs if "$" in e or "[[" in e]
    result = check_as_rules(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_dashboard_query_check_catches_bad_promql(tmp_path: Path) -> None:
    result = check_as_rules(['sum by (model) (rate(ner_requests_total{model=~".+"}[5m])'], tmp_path)
    assert result.returncode != 0
    assert "unclosed left parenthesis" in result.stdout + result.stderr


def test_dashboard_variable_substitution() -> None:
    variables = {"model": ".+", **GRAFANA_BUILTINS}
    assert (as_promql('rate(x{model=~"$model",m=~"${model}",n=~"${model:regex}",o=~"[[model]]"}[$__rate_interval])',
                      variables) == 'rate(x{model=~".+",m=~".+",n=~".+",o=~".+"}[5m])')
    with pytest.raises(KeyError, match="nope"):
        as_promql("x{a=~\"$nope\"}", variables)


def test_dashboard_covers_the_service() -> None:
    exprs = "\n".join(dashboard_exprs())
    for metric in ("ner_requests_total", "ner_request_duration_seconds_bucket", "ner_stage_duration_seconds_bucket",
                   "ner_inflight_requests", "ner_triton_up", "ner_entities_total", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us", "nv_inference_count", "nv_inference_exec_count"):
        assert metric in exprs, metric
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_dashboard_layout() -> None:
    dashboard = dashboard_json()
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def subset_mismatches(original: Any, loaded: Any, path: str = "$") -> list[str]:
    """Where `loaded` does not hold `original` (keys dropped or values changed; added defaults are fine)."""
    if isinstance(original, dict):
        if not isinstance(loaded, dict):
            return [f"{path}: not an object"]
        found = []
        for key, value in original.items():
            found += subset_mismatches(value, loaded[key], f"{path}.{key}") if key in loaded else [f"{path}.{key}"]
        return found
    if isinstance(original, list):
        if not isinstance(loaded, list) or len(loaded) != len(original):
            return [f"{path}: list differs"]
        return [m for i, (a, b) in enumerate(zip(original, loaded, strict=True))
                for m in subset_mismatches(a, b, f"{path}[{i}]")]
    return [] if original == loaded else [f"{path}: {original!r} became {loaded!r}"]


def test_dashboard_loads_with_grafana_foundation_sdk() -> None:
    """Grafana's own generated models parse every part of the dashboard and write it back unchanged."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import dashboard as model
    from grafana_foundation_sdk.models import prometheus

    register_default_plugins()
    original = dashboard_json()
    loaded = model.Dashboard.from_json(original)

    assert loaded.uid == "triton-ner" and loaded.schema_version == original["schemaVersion"]
    panels = [p for p in loaded.panels or [] if isinstance(p, model.Panel)]
    assert len(panels) == len([p for p in original["panels"] if p["type"] != "row"])
    for panel in panels:
        # Options and field config decode into the panel plugin's classes (not left as plain dicts) ...
        assert not isinstance(panel.options, dict), panel.title
        assert panel.field_config is not None and not isinstance(panel.field_config.defaults.custom, dict)
        # ... and every query into the Prometheus data query model.
        assert panel.targets and all(isinstance(t, prometheus.Dataquery) for t in panel.targets), panel.title

    written = json.loads(json.dumps(loaded, cls=JSONEncoder))
    assert subset_mismatches(original, written) == []


def test_latency_panels_show_exemplars_linked_to_traces() -> None:
    """The latency panels ask Prometheus for exemplars, and the provisioned data source turns their trace_id into
    a link to the tracing backend's data source."""
    panels = {p.get("title"): p for p in all_panels(dashboard_json())}
    for title in ("Request latency p50 / p99", "Stage latency p50", "Stage latency p99"):
        assert all(t.get("exemplar") is True for t in panels[title]["targets"]), title
    sources = yaml.safe_load((DEPLOY / "grafana" / "datasources.yaml").read_text())["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    (link,) = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == "trace_id" and by_uid[link["datasourceUid"]]["type"] == "tempo"
