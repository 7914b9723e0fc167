# The control image: `lorafleet operator`, every pool pod's `lorafleet sidecar` and `lorafleet gateway`. No torch.
#   docker build -f docker/control.Dockerfile -t lorafleet/control:0.1.0 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY src ./src
COPY contracts ./contracts
COPY operator ./operator
COPY sidecar ./sidecar
COPY runtime ./runtime
COPY gateway ./gateway
# requirements.lock pins the versions the tests ran with; as constraints it installs only what the
# `control` extra needs.
RUN pip install --constraint requirements.lock ".[control]" \
    && python -c "import lorafleet.operator.cli, lorafleet.sidecar, lorafleet.gateway.cli" \
    && cd / && rm -rf /src

# A numeric UID, so `runAsNonRoot: true` can be verified by the kubelet.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lorafleet
USER 10001
WORKDIR /tmp

ENTRYPOINT ["lorafleet"]
CMD ["operator"]
