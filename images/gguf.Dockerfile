# GGUF image: the pinned llama.cpp (quantize, completion, perplexity, imatrix, bench, tokenize,
# export-lora), its converters and gguf-py, and their Python dependencies (CPU torch). Runs the
# convert, quantize, smoke and evaluate stages.
#   docker build -f images/gguf.Dockerfile -t kiln-gguf .              (invoke build --stage gguf)
# Build args and the optional CA secret: as in merge.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: compiles llama.cpp with the same code the local runtime uses ------------------
FROM ${BASE_IMAGE} AS builder
ARG JOBS=2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends cmake g++ make; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/venv; \
    cmake --version
COPY requirements/constraints.txt /opt/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --no-compile -c /opt/constraints.txt rich pydantic pyyaml; \
    python -c 'import rich'
WORKDIR /src
COPY stages/__init__.py /src/stages/__init__.py
COPY stages/common /src/stages/common
RUN --mount=type=secret,id=ca \
    set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python -m stages.common.llamacpp build --prefix /opt/llama.cpp --jobs "${JOBS}"; \
    mkdir -p /opt/out/build/bin /opt/out/src; \
    cp -a /opt/llama.cpp/build/bin/. /opt/out/build/bin/; \
    for f in convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py python; do \
        cp -a "/opt/llama.cpp/src/$f" /opt/out/src/; \
    done; \
    cp /opt/llama.cpp/.kiln-built /opt/out/; \
    LD_LIBRARY_PATH=/opt/out/build/bin /opt/out/build/bin/llama-quantize --help > /dev/null 2>&1 || [ $? -eq 1 ]

# --- runtime: binaries, converter, Python deps; no compiler ---------------------------------
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG UID=10001
ARG GID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/work/cache/hf \
    KILN_LLAMA_CPP=/opt/llama.cpp

RUN set -eux; \
    groupadd --gid "${GID}" kiln; \
    useradd --uid "${UID}" --gid kiln --no-create-home --home-dir /tmp kiln; \
    python3 -m venv /opt/venv; \
    mkdir -p /work; \
    python3 --version

COPY requirements/constraints.txt /opt/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    --mount=type=bind,source=cache/wheels,target=/wheels \
    set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --no-compile --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c /opt/constraints.txt torch; \
    pip install --no-compile -c /opt/constraints.txt transformers safetensors sentencepiece protobuf numpy jinja2 \
        diskcache typing_extensions pydantic pyyaml rich psutil; \
    python -c 'import torch, transformers, sentencepiece, jinja2; assert not torch.version.cuda'

COPY --from=builder /opt/out /opt/llama.cpp
RUN set -eux; \
    if command -v cc gcc g++ cmake; then echo "a compiler in the runtime image" >&2; exit 1; fi; \
    LD_LIBRARY_PATH=/opt/llama.cpp/build/bin /opt/llama.cpp/build/bin/llama-completion --version

WORKDIR /work
COPY stages /work/stages
RUN python -c 'import stages.convert, stages.quantize, stages.smoke, stages.evaluate'
USER ${UID}:${GID}
ENTRYPOINT []
CMD ["python", "-m", "stages.convert", "--help"]
