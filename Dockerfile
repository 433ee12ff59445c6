# Bastion sidecar image. Build: docker build -t bastion .
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bastion ./bastion
COPY rules ./rules
RUN pip install . && useradd --system --uid 10001 --home-dir /var/lib/bastion --create-home bastion

# The sidecar runs as its own user: the agent's process cannot rewrite the rules or read the CA key.
USER bastion
ENV BASTION_HOME=/var/lib/bastion BASTION_RULES=/app/rules/default.yaml \
    BASTION_LISTEN=0.0.0.0:8080 BASTION_ADMIN=0.0.0.0:8081
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2)" || exit 1
ENTRYPOINT ["bastion"]
CMD ["serve"]
