# The reparam operator (kopf): no torch, no CUDA. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/reparam/reparam-operator:0.1.0 .
# Runs as uid/gid 65532 with a read-only root file system (see charts/reparam-operator).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/reparam \
 && /opt/reparam/bin/pip install ".[operator]"

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/reparam /opt/reparam
ENV PATH=/opt/reparam/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 9090 8080
ENTRYPOINT ["python", "-m", "reparam.operator"]
