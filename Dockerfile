# One image for the API and the worker (the command picks which). CPU by default; for CUDA,
# build FROM an nvidia/cuda runtime image with Python 3.11 and install torch's CUDA wheel instead.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 LORAQ_DATA_DIR=/data
WORKDIR /app

# torch first, from the CPU index, so the project's pin does not pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# The dashboard's chart library comes from npm (package-lock.json), served from node_modules.
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund
COPY pyproject.toml README.md ./
COPY trainer trainer
COPY loraq loraq
COPY loraq_client loraq_client
COPY api api
COPY worker worker
COPY bench bench
COPY migrations migrations
COPY alembic.ini ./
# Editable: the API serves the dashboard's files and node_modules from /app, next to the code.
RUN pip install -e .

VOLUME /data
EXPOSE 8000
# Migrate, then serve (the first start prints the admin key and writes it to /data/admin-key); the worker service overrides the command with `python -m worker`.
CMD ["sh", "-c", "python -m loraq.migrate && python -m trainer tiny-model /data/models/tiny-sd >/dev/null && uvicorn api.main:create_app --factory --host 0.0.0.0 --port 8000 --timeout-graceful-shutdown 5"]
