# One image for every component: training (torchrun -m spade train), evaluation, packaging, registration,
# the pipeline's steps, the MLflow tracking server (mlflow server) and serving (torchserve, Java 17).
#
#   GPU (default):  docker build -t spade .
#   CPU:            docker build -t spade:cpu \
#                     --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   Here:           make image   (spade:dev; a local stand-in base where no registry can be reached)
#
# The CUDA base image already carries torch + torchvision built for CUDA; the CPU variant installs the CPU
# wheels from TORCH_INDEX_URL first, so the dependencies find torch satisfied and pull no CUDA libraries.
# Commands are given in full (`docker run IMAGE spade train ...`, `... mlflow server ...`): the image has
# no entrypoint, so runners that set only the container's command (kfp.local's DockerRunner) work too.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""
ARG EXTRAS=serve,pipeline,tracking
ARG APP_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# TorchServe's frontend is Java: a headless JRE 17 (bookworm and Ubuntu 22.04 both ship it).
# (man1 must exist for the JRE's update-alternatives on slim images)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && java -version

RUN useradd --create-home --uid ${APP_UID} --user-group --shell /bin/bash spade

WORKDIR /app
# The dependencies first, from pyproject.toml alone (scripts/requirements.py lists them with the EXTRAS and
# the build backend): this layer is rebuilt when they change, not on a source or README edit. Extras:
# serve (TorchServe), pipeline (kfp), tracking (PostgreSQL driver for mlflow server).
COPY pyproject.toml scripts/requirements.py /tmp/spade-meta/
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" torch torchvision; fi \
    && python /tmp/spade-meta/requirements.py /tmp/spade-meta/pyproject.toml "${EXTRAS}" > /tmp/spade-meta/requirements.txt \
    && pip install -r /tmp/spade-meta/requirements.txt \
    && rm -rf /tmp/spade-meta

# Then the sources (.dockerignore keeps the context to them: no .venv, data, runs, MLflow stores), installed
# without touching the dependencies and without a build environment of their own (about a minute).
COPY --chown=spade:spade . /app
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build *.egg-info \
    && spade --help > /dev/null \
    && torchserve --help > /dev/null \
    && mlflow --version

USER spade
# inference, management, metrics (TorchServe); MLflow
EXPOSE 8080 8081 8082 5000
CMD ["spade", "--help"]
