# One image for the API and the worker (the command picks which). CPU by default; for CUDA,
# build FROM an nvidia/cuda runtime image with Python 3.11 and install torch's CUDA wheel instead.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 LORAQ_DATA_DIR=/data
WORKDIR /app

# torch first, from the CPU index, so the project's pin does not pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY trainer trainer
COPY loraq loraq
COPY api api
COPY worker worker
COPY bench bench
COPY migrations migrations
COPY alembic.ini ./
RUN pip install .

VOLUME /data
EXPOSE 8000
# Migrate, then serve; the worker service overrides the command with `python -m worker`.
CMD ["sh", "-c", "python -m loraq.migrate && python -m trainer tiny-model /data/models/tiny-sd >/dev/null && uvicorn api.main:create_app --factory --host 0.0.0.0 --port 8000 --timeout-graceful-shutdown 5"]
