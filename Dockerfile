# syntax=docker/dockerfile:1
# One image for the API and the model workers (docker-compose.yml picks the command).
# The builder compiles whatever has no wheel into a virtual environment; the final stage copies only that
# environment onto a slim Python, runs as an unprivileged user and has no compiler or package cache.
# EXTRAS=worker brings torch (the CUDA build PyPI serves for Linux x86_64) and transformers; an API-only image
# can be built with --build-arg EXTRAS= (the API never imports torch).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ARG EXTRAS=worker
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip setuptools wheel
WORKDIR /src
# Every requirement becomes a wheel, installed with no index: what the image holds is what was built here.
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY hooks ./hooks
COPY fhir_mappings ./fhir_mappings
COPY worker ./worker
RUN /opt/venv/bin/pip wheel --wheel-dir /wheels ".${EXTRAS:+[${EXTRAS}]}" \
    && /opt/venv/bin/pip install --no-index --find-links /wheels ".${EXTRAS:+[${EXTRAS}]}" \
    && rm -rf /wheels

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    MEDGEMMA_CDS_TRUSTED_ISSUERS=/etc/medgemma-cds/trusted-issuers.json
RUN groupadd --system --gid 10001 medgemma \
    && useradd --system --uid 10001 --gid medgemma --home-dir /home/medgemma --create-home medgemma \
    && mkdir -p /cache/huggingface /models /etc/medgemma-cds /run/medgemma-cds \
    && chown medgemma:medgemma /cache/huggingface /models /run/medgemma-cds
COPY --from=builder /opt/venv /opt/venv
# The CDS Hooks sandbox as the one trusted issuer (its public JWKS ships with the package); mount another
# trust file over it, or point MEDGEMMA_CDS_TRUSTED_ISSUERS elsewhere, for a real EHR. Anyone can mint the
# sandbox's JWTs, so the API starts with this file only in development mode (MEDGEMMA_CDS_DEV_MODE=true).
COPY cds_service/data/trusted-issuers.sandbox.json /etc/medgemma-cds/trusted-issuers.json
COPY cds_service/data/jwks /etc/medgemma-cds/jwks
USER medgemma
WORKDIR /home/medgemma
EXPOSE 8080
# Healthchecks are per role (API, worker), so they live in docker-compose.yml, not here.
CMD ["medgemma-cds", "serve", "--host", "0.0.0.0", "--port", "8080"]
