# Bastion sidecar image.
#
#   docker build -t bastion:0.1.0 .
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 -v bastion-home:/var/lib/bastion bastion:0.1.0
#
# Two stages: the first builds the wheel and installs it with its dependencies into a virtualenv
# (/opt/bastion), the second copies only that virtualenv and the rules onto a fresh python:3.13-slim, so no
# source tree, build tool or pip cache ends up in the image. tests/test_deploy.py replays these steps (the
# COPY lines below, `pip install .` into a clean virtualenv, the ENV and the HEALTHCHECK) on every test run.

# ---- build ------------------------------------------------------------------------------------------------
FROM python:3.13-slim AS build
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bastion ./bastion
# bastion/demo/policy.yaml is a symlink to rules/examples/demo.yaml: the wheel carries its target.
COPY rules ./rules
RUN python -m venv /opt/bastion && /opt/bastion/bin/pip install .

# ---- runtime ----------------------------------------------------------------------------------------------
FROM python:3.13-slim
LABEL org.opencontainers.image.title="bastion" \
      org.opencontainers.image.description="A sidecar proxy that puts AI agents under control: identity-bound rules, task locks, approvals, full audit." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# The sidecar runs as its own user (uid 10001): the agent's process cannot rewrite the rules, read the CA key,
# the audit signing key or the spool. /var/lib/bastion is its home (CA, spool, keys, default SQLite store);
# /var/lib/bastion-ca is an empty directory for a volume shared with the agent, into which deploy/ copies the
# public half of the trust (ca-bundle.pem, mitmproxy-ca-cert.pem) and nothing else (Docker copies its owner
# into a fresh named volume).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/bastion --create-home --shell /usr/sbin/nologin bastion \
    && install -d -o bastion -g bastion -m 0755 /var/lib/bastion-ca
COPY --from=build /opt/bastion /opt/bastion
# rules/ holds only what users deploy and edit: default.yaml, the examples and the editor schema (test
# fixtures, whose comments spell out test tokens, live under tests/testdata/ and stay out of the image).
COPY rules /etc/bastion/rules

# Both listeners bind 0.0.0.0 inside the container so that the agent (another container) reaches the proxy and
# the health checks, Prometheus and the dashboard reach the admin listener. That is safe only where the network
# decides who gets there: in deploy/compose.yaml the agents sit on internal networks that reach nothing but
# their own sidecar, and the admin ports are published on the host's loopback only; in deploy/kubernetes/ the
# NetworkPolicies admit the admin port from the monitoring namespace (and, for the central dashboard, the ingress
# controller's) only, and a pod's sidecar proxy listens on the pod's loopback. Everything on the admin listener but
# /healthz, /readyz and /metrics needs a user token, and none is ever given to an agent. Do not publish 8081 on a
# public interface: serve the dashboard through a TLS-terminating proxy (see docs/deployment.md).
ENV PATH=/opt/bastion/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    BASTION_HOME=/var/lib/bastion BASTION_RULES=/etc/bastion/rules/default.yaml \
    BASTION_LISTEN=0.0.0.0:8080 BASTION_ADMIN=0.0.0.0:8081
USER bastion
WORKDIR /var/lib/bastion
VOLUME ["/var/lib/bastion"]
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8081/healthz', timeout=2)"]
ENTRYPOINT ["bastion"]
CMD ["serve"]
