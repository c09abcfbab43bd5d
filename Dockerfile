# together-meter: the metering proxy in a slim, non-root image.
#   docker build -t together-meter .
#   docker run --rm -e TOGETHER_API_KEY -e TOGETHER_METER_ADMIN_TOKEN \
#     -v "$PWD/config:/etc/together-meter:ro" -v together-meter-ledger:/var/lib/together-meter \
#     -p 127.0.0.1:8787:8787 -p 127.0.0.1:9787:9787 \
#     together-meter serve --config /etc/together-meter/docker.yaml
# The config directory is mounted read-only; its config must bind both listeners to 0.0.0.0 and
# keep the ledger under /var/lib/together-meter (config/docker.yaml does). docker-compose.yml runs
# this image next to Prometheus, Alertmanager and Grafana: docs/monitoring.md.
#
# The base is pinned by exact tag (Python patch release and Debian release), not by digest.

# ---- build: the project and all its dependencies as wheels ----
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Dependencies come from PyPI, unless the build context holds a `wheelhouse/` directory: then
# only those wheels are used (--no-index), for builds that cannot reach PyPI. The repository's
# .dockerignore keeps `wheelhouse/` out of a plain `docker build .`; deploy/container-test.sh
# builds from a context with one (wheels made on the host: docs/monitoring.md#what-ci-runs).
RUN --mount=type=bind,source=.,target=/context \
    if [ -d /context/wheelhouse ]; then \
        pip wheel --no-index --find-links /context/wheelhouse --wheel-dir /wheels . ; \
    else \
        pip wheel --wheel-dir /wheels . ; \
    fi

# ---- final: a venv with only the installed wheels ----
FROM python:3.11.14-slim-bookworm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# The wheels are bind-mounted from the build stage (BuildKit), so they never land in a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheels together-meter \
    && groupadd --system --gid 10001 meter \
    && useradd --system --uid 10001 --gid meter --home-dir /var/lib/together-meter \
        --no-create-home --shell /usr/sbin/nologin meter \
    && mkdir -p /etc/together-meter /var/lib/together-meter \
    && chown meter:meter /var/lib/together-meter

# A named volume mounted here starts with this directory's owner (meter), so SQLite can write.
VOLUME ["/var/lib/together-meter"]
WORKDIR /var/lib/together-meter
USER 10001:10001

# 8787: public OpenAI-compatible API (/v1/*); 9787: admin (/metrics, /healthz, /readyz, /admin/*).
EXPOSE 8787 9787

# slim has no curl: ask the admin listener's /healthz with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9787/healthz', timeout=4)"]

# SIGTERM drains requests in progress for limits.drain_timeout (30 s by default): give the
# container that long to stop (docker stop -t 40, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["together-meter"]
CMD ["serve", "--config", "/etc/together-meter/config.yaml"]
