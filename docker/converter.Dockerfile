# The reparam converter that the operator's Jobs run (`reparam convert ...`).
# CUDA PyTorch base: torch comes from the base image, pip keeps it (pyproject: torch>=2.3).
# Build from the repository root:
#   docker build -f docker/converter.Dockerfile -t ghcr.io/reparam/reparam:0.1.0 .
# Runs as uid/gid 65532 (the Job's securityContext, src/reparam/operator/jobs.py RUN_AS_USER);
# the Job mounts emptyDirs at /work (HOME, outputs) and /tmp, the root file system is read-only.
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Fail the build if pip would replace the base image's CUDA torch, or if the installed set is inconsistent.
# [converter] brings MLflow's client, mlflow-skinny (not the full mlflow: no pandas/scipy/scikit-learn/pyarrow/
# matplotlib/flask in the image; tests/test_mlflow_skinny.py proves the registry paths without them).
RUN python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && pip install ".[converter]" \
 && pip check \
 && python -c "import torch; assert torch.version.cuda, 'CUDA torch was replaced'" \
 && rm -rf /src
WORKDIR /work
ENV HOME=/work \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_DISABLE_TELEMETRY=true
USER 65532:65532
ENTRYPOINT ["reparam"]
CMD ["--help"]
