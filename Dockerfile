# syntax=docker/dockerfile:1
#
# credicorp-token-proxy container image.
#
#   docker build -t credicorp-token-proxy:0.1.0 .
#   docker run --read-only --tmpfs /tmp \
#     -v ./config.yaml:/etc/credicorp-proxy/config.yaml:ro \
#     -v ./secrets:/var/run/secrets/credicorp:ro \
#     -p 127.0.0.1:8080:8080 -p 9090:9090 \
#     -e CCP_LISTEN=0.0.0.0:8080 credicorp-token-proxy:0.1.0
#
# (In a Kubernetes pod the proxy keeps its default 127.0.0.1:8080: the app
# reaches it over the pod's shared loopback and nothing else can.)
#
# Stage 1 builds wheels of the project and of every dependency; stage 2
# installs those wheels only, so the final image has no compiler, no build
# backend run and no source tree.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# README.md is the package's long description (pyproject `readme`).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# The speed extra (uvloop) is part of the image: the event loop is most of the hot path.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[speed]'

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="credicorp-token-proxy" \
      org.opencontainers.image.description="Sidecar reverse proxy that injects least-privilege Credicorp OAuth tokens" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"

# Nothing is written at run time outside /tmp (mount a tmpfs / emptyDir there):
# no .pyc files next to the code, no pip cache, unbuffered JSON logs on stderr.
ENV CCP_CONFIG=/etc/credicorp-proxy/config.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/tmp

# The wheels are bind-mounted from the build stage, so they never become a layer.
# `pip install` compiles the .pyc files now, as root, into the read-only image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
 && groupadd --system --gid 10001 ccp \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin ccp \
 && mkdir -p /etc/credicorp-proxy /var/run/secrets/credicorp

USER 10001:10001
WORKDIR /tmp

# 8080: the proxy (binds 127.0.0.1 unless CCP_LISTEN says otherwise)
# 9090: admin listener: GET /metrics, /healthz, /readyz
EXPOSE 8080 9090

# Used by Docker/Podman only (Kubernetes ignores it and uses the pod's probes).
# `healthcheck` reads admin_listen from the same config as `run` (CCP_CONFIG,
# then CCP_ADMIN_LISTEN), unix: sockets included, so it follows the config.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["credicorp-proxy", "healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["credicorp-proxy"]
CMD ["run", "-c", "/etc/credicorp-proxy/config.yaml"]
