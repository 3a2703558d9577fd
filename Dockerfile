# syntax=docker/dockerfile:1
# edge-compressor: the `compress` CLI in a container, to run on the target device itself
# (latency is measured where the model will run; the CLI never falls back to other hardware).
#
# Build (BuildKit, the default since Docker 23, pulls only the base that BASE selects):
#   docker build -t edge-compressor:cuda .                              # x86_64 host with an NVIDIA GPU
#   docker build --build-arg BASE=jetson -t edge-compressor:jetson .    # on the Jetson (JetPack 6.1+, L4T r36.4)
#
# Run: the project folder (weights, data, compress.yaml) is mounted at /work, runs land in ./runs,
# the TensorRT timing cache persists in the compress-cache volume:
#   docker run --rm --gpus all -v "$PWD:/work" -v compress-cache:/cache edge-compressor:cuda --target h100 --latency-ms 1
#   docker run --rm --runtime nvidia --security-opt systempaths=unconfined -v "$PWD:/work" -v compress-cache:/cache edge-compressor:jetson --target jetson-orin --latency-ms 5
#   docker run --rm --runtime nvidia --security-opt systempaths=unconfined edge-compressor:jetson doctor
# (systempaths=unconfined: Docker masks /sys/firmware, so /proc/device-tree/model, which names the
# Jetson module for the target check, is unreadable in a container without it.)

# x86 or jetson; selects one of the two base stages below.
ARG BASE=x86
# One NGC release for both: CUDA PyTorch (2.5.0a0) + TensorRT 10.5 + Python 3.10, CUDA 12.6.
# The TensorRT runner takes its device buffers from a CUDA torch, so the base must carry one that
# matches its CUDA; the NGC PyTorch images are tested as a set. Host driver: R560+ (data-centre
# GPUs also run it on R535/R545 through CUDA forward compatibility).
ARG X86_IMAGE=nvcr.io/nvidia/pytorch:24.10-py3
# The same release built for the Orin iGPU; needs JetPack 6.1 or later (L4T r36.4) on the device.
# JetPack 6.0 (r36.3): use nvcr.io/nvidia/pytorch:24.08-py3-igpu.
ARG JETSON_IMAGE=nvcr.io/nvidia/pytorch:24.10-py3-igpu

FROM ${X86_IMAGE} AS base-x86
FROM ${JETSON_IMAGE} AS base-jetson

FROM base-${BASE}
ARG BASE
# The Makefile's pin. Installed only when the base has no CUDA torch (e.g. X86_IMAGE=
# nvcr.io/nvidia/tensorrt:24.10-py3); the base's own CUDA torch is never reinstalled over.
ARG TORCH=torch==2.13.0
# PyPI's torch 2.13 for x86 is a CUDA 13 build (driver R580+); point this at a PyTorch CUDA index
# that matches the base's CUDA when the base is older.
ARG TORCH_INDEX_URL=https://pypi.org/simple
# pyproject.toml extras. x86: tensorrt (the TensorRT bindings, pinned below to the base's own, and
# NVML for telemetry). Jetson: none, because TensorRT comes with the base and a pip `tensorrt` wheel is an
# x86/SBSA build that does not run on the Orin iGPU, and Jetson has no NVML (telemetry reads sysfs).
ARG X86_EXTRAS=tensorrt
ARG JETSON_EXTRAS=
# 1000 is the first user on a Jetson and on most Linux hosts, so files in a mounted folder stay theirs.
ARG APP_UID=1000
ARG APP_GID=1000

# COMPRESS_PROFILES_DIR: profiles/ is not package data, so a non-editable install cannot find it by
# itself; point at the copy below. COMPRESS_CACHE_DIR: TensorRT timing caches, on the /cache volume.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    COMPRESS_CACHE_DIR=/cache \
    COMPRESS_PROFILES_DIR=/opt/edge-compressor/profiles

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# pip, only where the base lacks it (e.g. nvcr.io/nvidia/l4t-jetpack as JETSON_IMAGE).
RUN python3 -m pip --version >/dev/null 2>&1 \
    || { apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*; }

# torch first, as the Makefile does: keep the base's CUDA torch, else install the pin. Then refuse a
# CPU-only torch, because the TensorRT runner needs CUDA device buffers from torch (import only, no GPU
# is needed at build time).
RUN if python3 -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
        echo "keeping the base image's CUDA torch"; \
    else \
        python3 -m pip install --index-url "$TORCH_INDEX_URL" "$TORCH"; \
    fi \
    && python3 -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); \
sys.exit(0 if torch.version.cuda else 'torch has no CUDA build; the TensorRT runner needs one')"

# TensorRT must come from the base (matched to its CUDA); find_spec does not load the library.
RUN python3 -c "import importlib.util, sys; \
sys.exit(0 if importlib.util.find_spec('tensorrt') else 'no TensorRT Python bindings (tensorrt) in the base image')"

# Pin torch and tensorrt to the versions the base has, so installing the package can never swap them
# for PyPI builds against another CUDA.
RUN mkdir -p /etc/edge-compressor \
    && python3 -c "import importlib.metadata as md; \
[print(f'{n}=={d.version}') for n in ('torch', 'tensorrt') for d in list(md.distributions(name=n))[:1]]" \
    > /etc/edge-compressor/constraints.txt \
    && cat /etc/edge-compressor/constraints.txt

# Only what the wheel and the profiles need (README.md is the package's readme), so edits elsewhere
# do not invalidate the install layer.
WORKDIR /opt/edge-compressor
COPY pyproject.toml README.md ./
COPY compressor ./compressor
COPY deploy ./deploy
COPY profiles ./profiles

# The package itself with the extras for this BASE. A tensorrt extra whose bindings pip does not know
# (apt-installed) would download a second TensorRT from PyPI, so that case stops the build instead.
# The checks run from / so that they import the installed package, not this source folder.
RUN extras="$X86_EXTRAS"; if [ "$BASE" = jetson ]; then extras="$JETSON_EXTRAS"; fi; \
    case ",$extras," in *,tensorrt,*) grep -q '^tensorrt==' /etc/edge-compressor/constraints.txt \
        || { echo "the base's TensorRT is not pip-installed; build with X86_EXTRAS= (empty)" >&2; exit 1; } ;; esac; \
    python3 -m pip install --constraint /etc/edge-compressor/constraints.txt ".${extras:+[$extras]}" \
    && cd / \
    && python3 -c "import sys; from deploy.profiles import list_profiles, profiles_dir; \
n = len(list_profiles()); print(n, 'profiles in', profiles_dir()); sys.exit(0 if n else 'no target profiles found')" \
    && compress --help >/dev/null

# Non-root. video: the Jetson GPU device nodes are group video (gid 44 in Ubuntu and in JetPack).
# /cache is world-writable (sticky) so that `docker run --user $(id -u):$(id -g)` can write to it too.
RUN groupadd --non-unique --gid "$APP_GID" compress \
    && useradd --create-home --non-unique --uid "$APP_UID" --gid "$APP_GID" --groups video compress \
    && mkdir -p /work /cache \
    && chown compress:compress /work /cache \
    && chmod 1777 /cache

# /work: the project (runs go to /work/runs, so mount the project at /work rather than a volume on
# /work/runs, which would hide the runs from the mounted folder). /cache: timing caches across runs.
VOLUME ["/work", "/cache"]
WORKDIR /work
USER compress
# Replaces the NGC entrypoint script (a banner); `docker run IMAGE --target ...` runs the job.
ENTRYPOINT ["compress"]
CMD ["doctor"]
