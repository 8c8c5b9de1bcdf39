# syntax=docker/dockerfile:1
# One image for the API, the workers and the one-shot migrations (docker-compose.yml picks the
# command). TORCH_VARIANT picks torch's build from PyTorch's wheel index:
#   cpu     (the default) runs anywhere; the API, the migrations and CPU workers use it
#   cu128   CUDA 12.8 (or another cuXYZ the index has for this torch): the wheel brings its CUDA
#           libraries, so the base stays python:slim; the host needs the NVIDIA driver and the
#           NVIDIA Container Toolkit.
# Build: docker build -t loraq:cpu .    docker build --build-arg TORCH_VARIANT=cu128 -t loraq:cuda .
# Checked without a Docker engine by tests/deploy (hadolint and a parser).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- the dashboard's one front-end library (uPlot), exactly as package-lock.json pins it -------
FROM node:22-bookworm-slim AS dashboard
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error

# --- Python packages in a virtual environment, copied whole into the runtime stage ------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index: installed later as a plain dependency pip would take the
# default (CUDA) wheel whatever the variant.
RUN python -m venv /opt/venv \
    && pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /app
# The dependencies alone first (a layer that survives code changes), then the code.
COPY pyproject.toml README.md ./
RUN mkdir trainer loraq loraq_client api worker bench \
    && pip install . && pip uninstall --yes loraq
COPY trainer trainer
COPY loraq loraq
COPY loraq_client loraq_client
COPY api api
COPY worker worker
COPY bench bench
COPY migrations migrations
COPY alembic.ini ./
# Editable: the code stays in /app, where the API finds the dashboard's files, node_modules and
# the migrations next to it (the runtime stage has /app and /opt/venv at the same paths).
RUN pip install --no-deps -e .

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 \
    LORAQ_DATA_DIR=/data LORAQ_HOST=0.0.0.0 LORAQ_PORT=8000 HF_HOME=/data/huggingface
# A user of its own, never root; the code is root's and read-only to it, the data volume its own
# (a named volume mounted on /data takes this folder's owner on first use).
RUN groupadd --system --gid 10001 loraq \
    && useradd --system --uid 10001 --gid loraq --home-dir /home/loraq --create-home --shell /usr/sbin/nologin loraq \
    && mkdir /data && chown loraq:loraq /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY --from=dashboard /build/node_modules /app/node_modules
WORKDIR /app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["python", "-m", "loraq.deploy", "check-api"]
# The API; the compose file runs the worker (`python -m worker`) and the migrations
# (`python -m loraq.deploy init`) from the same image. Without compose, run that init once first:
#   docker run --rm -v loraq-data:/data loraq:cpu python -m loraq.deploy init
# uvicorn takes its worker count from WEB_CONCURRENCY (docker-compose.yml sets it from LORAQ_API_WORKERS).
CMD ["uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "5"]
