# syntax=docker/dockerfile:1
# HRNet images, one file, four targets (README "Deploy"):
#   docker build --target cpu    -t hrnet:cpu .     hrnet serve, ONNX Runtime on the CPU
#   docker build --target gpu    -t hrnet:gpu .     hrnet serve, ONNX Runtime on CUDA 13 + cuDNN
#                                                   (TensorRT too when CUDA_IMAGE ships it)
#   docker build --target ascend -t hrnet:ascend \
#       --build-arg CANN_IMAGE=... --build-arg MINDSPORE_LITE_WHEEL=... .
#                                                   hrnet serve on an Ascend NPU (MINDIR)
#   docker build --target train  -t hrnet:train .   hrnet train / msrun with MindSpore
#
# Each serving target ends with the same lines (tests/test_dockerfile.py holds them equal): a
# virtual environment copied from its build stage (no compilers, no source in the image), a
# non-root user, the model repository as a volume at /models, gRPC on 8001, REST on 8000 and
# Prometheus (with /healthz, /readyz) on 8002, every setting through HRNET_* variables
# (serving/config.py) and a HEALTHCHECK that asks
# the gRPC health service through `hrnet health`, which follows HRNET_PORT.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu's CUDA major version must match this image's. A TensorRT image of the same CUDA
# (nvcr.io/nvidia/tensorrt:<release>-py3) makes ONNX Runtime's TensorRT provider usable as well.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# A CANN image with Python 3.11 and the driver version of the hosts (Docker Hub ascendai/cann).
ARG CANN_IMAGE=ascendai/cann:8.5.0-910b-ubuntu22.04-py3.11
# pip requirements: a version from PyPI, a URL, or a file put under wheels/ in the build context
# (wheels/name.whl is /src/wheels/name.whl in the build). MindSpore Lite is published on
# MindSpore's download site, not PyPI; without it the server runs MINDIR through MindSpore itself.
ARG MINDSPORE_WHEEL=mindspore==2.10.0
ARG MINDSPORE_LITE_WHEEL=
# The training image: the CPU base by default; a CANN (or CUDA) image for accelerated training,
# with the matching MINDSPORE_WHEEL.
ARG TRAIN_IMAGE=${PYTHON_IMAGE}

# ---------------------------------------------------------------------------------------------
# cpu
FROM ${PYTHON_IMAGE} AS cpu-build
COPY . /src
RUN python -m venv /opt/hrnet \
    && /opt/hrnet/bin/pip install --no-cache-dir -c /src/constraints.txt "/src[serve]"

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --user-group --no-create-home hrnet
COPY --from=cpu-build /opt/hrnet /opt/hrnet
ENV PATH=/opt/hrnet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HRNET_REPO=/models \
    HRNET_PORT=8001 \
    HRNET_HTTP_PORT=8000 \
    HRNET_METRICS_PORT=8002 \
    HRNET_METRICS_HOST=0.0.0.0 \
    HRNET_LOG_FORMAT=json
VOLUME ["/models"]
EXPOSE 8000 8001 8002
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["hrnet", "health", "--timeout", "4"]
ENTRYPOINT ["hrnet", "serve"]

# ---------------------------------------------------------------------------------------------
# gpu
FROM ${CUDA_IMAGE} AS gpu-python
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-python AS gpu-build
# Extra pip requirements: "onnxruntime-gpu[cuda,cudnn]" brings CUDA and cuDNN as pip packages,
# for a CUDA_IMAGE without them (a plain Debian or Ubuntu image with python3).
ARG GPU_EXTRA_REQUIREMENTS=
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN python3 -m venv /opt/hrnet \
    && /opt/hrnet/bin/pip install --no-cache-dir -c /src/constraints.txt \
        "/src[gpu]" ${GPU_EXTRA_REQUIREMENTS:+"$GPU_EXTRA_REQUIREMENTS"}

FROM gpu-python AS gpu
RUN useradd --system --uid 10001 --user-group --no-create-home hrnet
COPY --from=gpu-build /opt/hrnet /opt/hrnet
# CUDA and cuDNN from pip (GPU_EXTRA_REQUIREMENTS) lie inside the venv, where the dynamic loader
# does not look: list their folders for it (none on a CUDA_IMAGE that ships them).
RUN find /opt/hrnet/lib -type d -path "*/site-packages/nvidia/*/lib" > /etc/ld.so.conf.d/hrnet-pip-cuda.conf \
    && ldconfig
ENV PATH=/opt/hrnet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HRNET_REPO=/models \
    HRNET_PORT=8001 \
    HRNET_HTTP_PORT=8000 \
    HRNET_METRICS_PORT=8002 \
    HRNET_METRICS_HOST=0.0.0.0 \
    HRNET_LOG_FORMAT=json \
    HRNET_DEVICE=gpu
VOLUME ["/models"]
EXPOSE 8000 8001 8002
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["hrnet", "health", "--timeout", "4"]
ENTRYPOINT ["hrnet", "serve"]

# ---------------------------------------------------------------------------------------------
# ascend
FROM ${CANN_IMAGE} AS ascend-build
ARG MINDSPORE_WHEEL
ARG MINDSPORE_LITE_WHEEL
COPY . /src
WORKDIR /src
RUN python3 -m venv /opt/hrnet \
    && /opt/hrnet/bin/pip install --no-cache-dir -c /src/constraints.txt \
        "/src[serve]" "${MINDSPORE_WHEEL}" ${MINDSPORE_LITE_WHEEL:+"$MINDSPORE_LITE_WHEEL"}

FROM ${CANN_IMAGE} AS ascend
USER 0:0
RUN useradd --system --uid 10001 --user-group --no-create-home hrnet
COPY --from=ascend-build /opt/hrnet /opt/hrnet
ENV PATH=/opt/hrnet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HRNET_REPO=/models \
    HRNET_PORT=8001 \
    HRNET_HTTP_PORT=8000 \
    HRNET_METRICS_PORT=8002 \
    HRNET_METRICS_HOST=0.0.0.0 \
    HRNET_LOG_FORMAT=json \
    HRNET_DEVICE=ascend
VOLUME ["/models"]
EXPOSE 8000 8001 8002
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["hrnet", "health", "--timeout", "4"]
# CANN's libraries are found through the variables its set_env.sh exports.
ENTRYPOINT ["bash", "-c", "source /usr/local/Ascend/ascend-toolkit/set_env.sh && exec hrnet serve \"$@\"", "hrnet"]

# ---------------------------------------------------------------------------------------------
# train
FROM ${TRAIN_IMAGE} AS train-build
ARG MINDSPORE_WHEEL
COPY . /src
WORKDIR /src
RUN python3 -m venv /opt/hrnet \
    && /opt/hrnet/bin/pip install --no-cache-dir -c /src/constraints.txt "/src[train]" "${MINDSPORE_WHEEL}"

FROM ${TRAIN_IMAGE} AS train
USER 0:0
# MindSpore's CPU kernels link the system's OpenMP runtime.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home hrnet
COPY --from=train-build /opt/hrnet /opt/hrnet
# msrun starts `python` from PATH for every worker: the environment comes first.
ENV PATH=/opt/hrnet/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /work
USER 10001:10001
CMD ["hrnet", "train", "--help"]
