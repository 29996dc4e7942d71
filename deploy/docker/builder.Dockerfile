# syntax=docker/dockerfile:1
# ner-builder on a GPU host, on NVIDIA's TensorRT image of the SAME release as the Triton that serves the
# engines (25.09 -> TensorRT 10.13.3.9): a plan built by another TensorRT does not load ("version tag does
# not match"). The build fails if the TensorRT Python API installed here is not that version.
#   docker build -f deploy/docker/builder.Dockerfile -t triton-ner/builder:25.09 .    (from the repository root)
# The one command that builds engines into the repository (see docs/operations.md, "Rolling out a model version"):
#   docker run --rm --gpus all -v /srv/models:/models -v /srv/checkpoints:/checkpoints:ro triton-ner/builder:25.09 \
#     build /checkpoints/my-model --repository /models --name my-model --target trt-fp16
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.09-py3
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.22

FROM ${UV_IMAGE} AS uv

FROM ${TENSORRT_IMAGE}
# Must equal the TensorRT of the base image and pyproject.toml's `tensorrt` extra.
ARG TENSORRT_VERSION=10.13.3.9
# The project needs Python 3.11; NVIDIA's 25.xx images ship 3.12, so uv brings a standalone 3.11.
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN uv python install 3.11 && uv venv --seed --python 3.11 /opt/venv
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY gateway/ gateway/
COPY builder/ builder/
# The project itself; every dependency is pinned in pyproject.toml (hence DL3013 does not apply).
# hadolint ignore=DL3013
RUN pip install ".[builder,tensorrt]" \
    && python -c "import sys, tensorrt; v = tensorrt.__version__; sys.exit(0 if v == '${TENSORRT_VERSION}' else f'tensorrt {v} != ${TENSORRT_VERSION}')" \
    && case "${TRT_VERSION:-${TENSORRT_VERSION}}" in \
         "${TENSORRT_VERSION}"*) ;; \
         *) echo "base image TensorRT ${TRT_VERSION} != ${TENSORRT_VERSION}" >&2; exit 1 ;; \
       esac
WORKDIR /work
ENTRYPOINT ["ner-builder"]
CMD ["--help"]
