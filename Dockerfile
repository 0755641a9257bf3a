# videorelay: one small image; run as many replicas as you like against one Postgres.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000 \
    HOST=0.0.0.0 \
    STORAGE_DIR=/data/videos \
    DATABASE_URL=sqlite+aiosqlite:////data/videorelay.db

WORKDIR /srv/videorelay
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
# The checkout itself (DL3013 asks for pinned versions: a lockfile is not there yet).
# hadolint ignore=DL3013
RUN pip install ".[s3]" \
    && useradd --system --uid 10001 --home-dir /srv/videorelay videorelay \
    && mkdir -p /data && chown videorelay /data

USER 10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['PORT'], timeout=4)"]

# Migrations run on start (safe with several replicas: Postgres advisory lock), then serve.
CMD ["sh", "-c", "videorelay migrate && exec videorelay serve --host \"$HOST\" --port \"$PORT\""]
