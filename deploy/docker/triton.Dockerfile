# syntax=docker/dockerfile:1
# NVIDIA's Triton, pinned, plus what the ONNX entries' Python-backend model.py imports (onnxruntime).
# tensorrt_plan entries need nothing extra: the TensorRT backend is in the image. Release 25.09 carries
# TensorRT 10.13.3.9: engines must be built with that same TensorRT (builder.Dockerfile; pyproject's
# `tensorrt` extra; the gateway's NER_TENSORRT_VERSION in the gpu overlay). Change all of them together.
#   docker build -f deploy/docker/triton.Dockerfile -t triton-ner/triton:25.09 deploy/docker
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.09-py3
FROM ${TRITON_IMAGE}
# Same onnxruntime as the project's `triton` extra (the one model.py is tested with); the image's Python is
# the system one, hence --break-system-packages.
ARG ONNXRUNTIME_VERSION=1.32.0
RUN pip install --no-cache-dir --break-system-packages "onnxruntime==${ONNXRUNTIME_VERSION}" \
    && python3 -c "import onnxruntime"
# Numeric, non-root (Kubernetes runs it as 1000 with a read-only root filesystem).
USER 1000:1000
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models"]
