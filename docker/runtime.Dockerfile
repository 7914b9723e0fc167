# The runtime image: `lorafleet runtime`, the model server of every pool pod (torch).
#   docker build -f docker/runtime.Dockerfile -t lorafleet/runtime:0.1.0 .
# torch 2.13's default Linux wheel bundles CUDA and also runs on CPU-only nodes. For a smaller
# CPU-only image, pass PyTorch's CPU wheel index: --build-arg TORCH_INDEX_URL=<that index's URL>.
# For another CUDA userland, pass a CUDA base image that has Python 3.11 as BASE_IMAGE.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY src ./src
COPY contracts ./contracts
COPY operator ./operator
COPY sidecar ./sidecar
COPY runtime ./runtime
COPY gateway ./gateway
# torch first, from the chosen index; then the rest, pinned by requirements.lock.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch==$(sed -n 's/^torch==//p' requirements.lock)"; \
    fi \
    && pip install --constraint requirements.lock ".[runtime]" \
    && python -c "import lorafleet.runtime.cli" \
    && cd / && rm -rf /src

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lorafleet
USER 10001
WORKDIR /tmp
# The public API; the admin API listens on 127.0.0.1:8001 inside the pod only.
EXPOSE 8000

ENTRYPOINT ["lorafleet"]
CMD ["runtime"]
