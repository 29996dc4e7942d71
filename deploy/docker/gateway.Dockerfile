# syntax=docker/dockerfile:1
# ner-gateway: the gRPC service only (no torch, no Triton, no build tools in the final image).
#   docker build -f deploy/docker/gateway.Dockerfile -t triton-ner/gateway:0.1.0 .    (from the repository root)
# `pip install .` without extras installs the gateway's runtime dependencies; setup.py generates the gRPC code
# from protos/ during that install, with grpcio-tools from the isolated build environment, which is not kept.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY gateway/ gateway/
COPY builder/ builder/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/ner-gateway --help > /dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 ner \
    && useradd --system --uid 10001 --gid ner --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ner
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv
USER 10001:10001
EXPOSE 50051 9464
# Docker/compose only (Kubernetes uses its native gRPC probe): SERVING once Triton and the models are ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["ner-gateway", "health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["ner-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--model-repository", "/models"]
