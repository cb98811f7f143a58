# GGUF image: the pinned llama.cpp (quantize, completion, perplexity, imatrix, bench, tokenize,
# export-lora), its converters, gguf-py and the ctypes bindings, and their Python dependencies (CPU
# torch, matplotlib for the report's chart). Runs the convert, quantize, report, smoke and evaluate
# stages. No compiler: the builder stage has it.
#   DOCKER_BUILDKIT=1 docker build -f images/gguf.Dockerfile -t kiln-gguf .   (invoke build --stage gguf)
# Build args: BASE_IMAGE, TORCH_INDEX_URL, UID, GID (as in merge.Dockerfile); JOBS, parallel compile
# jobs (default: all cores). Optional CA secret for TLS-intercepting proxies: as in merge.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: compiles llama.cpp with the same code the local runtime uses ------------------
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG JOBS=
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
    pip install --no-compile -c /opt/constraints.txt rich; \
    python -c 'import rich'
# Only what `python -m stages.common.llamacpp build` imports, so that other source changes keep this
# layer. The build tree lives in a cache mount keyed by llamacpp.py's hash: when only names.py or
# errors.py changed, the build is a no-op and this layer takes seconds; when llamacpp.py changed
# (version, flags, tools), it starts from scratch.
WORKDIR /src
COPY stages/__init__.py stages/
COPY stages/common/__init__.py stages/common/names.py stages/common/errors.py stages/common/layout.py \
     stages/common/progress.py stages/common/llamacpp.py stages/common/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,id=kiln-llama.cpp,target=/opt/llama.cpp,sharing=locked \
    --mount=type=secret,id=ca \
    set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    key="$(sha256sum stages/common/llamacpp.py | cut -d' ' -f1)"; \
    if [ "$(cat /opt/llama.cpp/.kiln-key 2>/dev/null || true)" != "$key" ]; then \
        find /opt/llama.cpp -mindepth 1 -delete; \
    fi; \
    python -m stages.common.llamacpp build --prefix /opt/llama.cpp ${JOBS:+--jobs "$JOBS"}; \
    echo "$key" > /opt/llama.cpp/.kiln-key; \
    mkdir -p /opt/out/build/bin /opt/out/src; \
    cp -a /opt/llama.cpp/build/bin/. /opt/out/build/bin/; \
    for f in LICENSE convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py python; do \
        cp -a "/opt/llama.cpp/src/$f" /opt/out/src/; \
    done; \
    cp /opt/llama.cpp/.kiln-built /opt/out/; \
    LD_LIBRARY_PATH=/opt/out/build/bin /opt/out/build/bin/llama-completion --version

# --- runtime: binaries, converter, Python deps; no compiler ---------------------------------
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
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

# libgomp1: the OpenMP runtime the ggml CPU backend links against (the compiler stays in the builder).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends libgomp1; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --gid "${GID}" kiln; \
    useradd --uid "${UID}" --gid kiln --no-create-home --home-dir /tmp kiln; \
    python3 -m venv /opt/venv; \
    mkdir -p /work; \
    python3 --version

# The converter's and the bindings' dependencies (llama.cpp's requirements, CPU torch); gguf-py itself
# comes from the pinned tree, not from PyPI. Smoke tests with bytecode writing on leave .pyc files for
# the modules the stages import (the root is read-only at run time): see merge.Dockerfile.
COPY requirements/constraints.txt /opt/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    --mount=type=bind,source=cache/wheels,target=/wheels \
    set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --no-compile --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c /opt/constraints.txt torch; \
    pip install --no-compile -c /opt/constraints.txt transformers safetensors sentencepiece protobuf numpy jinja2 \
        diskcache typing_extensions pydantic pyyaml rich psutil matplotlib; \
    if find /opt/venv -name 'libcudart*' -o -name 'libcublas*' | grep -q .; then echo "CUDA libraries in a CPU image" >&2; exit 1; fi; \
    python -c 'import torch, transformers, sentencepiece, jinja2; assert not torch.version.cuda, torch.version.cuda'; \
    PYTHONDONTWRITEBYTECODE='' python -c 'import diskcache, numpy, safetensors.torch, sentencepiece, torch; \
        import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot; \
        import transformers.models.llama.modeling_llama, transformers.models.mistral.modeling_mistral; \
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer'

# Smoke tests: no compiler came along; llama-quantize finds its shared libraries (its --help lists the
# quant types, then exits 1); the converter and the ctypes bindings (against libllama) import.
COPY --from=builder /opt/out /opt/llama.cpp
RUN set -eux; \
    if command -v cc gcc g++ c++ cmake make; then echo "a compiler in the runtime image" >&2; exit 1; fi; \
    (LD_LIBRARY_PATH=/opt/llama.cpp/build/bin /opt/llama.cpp/build/bin/llama-quantize --help || true) | grep Q4_K_M; \
    export PYTHONDONTWRITEBYTECODE='' LLAMA_CPP_LIB_PATH=/opt/llama.cpp/build/bin; \
    PYTHONPATH=/opt/llama.cpp/src/gguf-py python /opt/llama.cpp/src/convert_hf_to_gguf.py --help > /dev/null; \
    PYTHONPATH=/opt/llama.cpp/src/gguf-py:/opt/llama.cpp/src/python python -c 'import gguf, llama_cpp; print(llama_cpp.__version__)'

WORKDIR /work
# The last two layers hold the code (docker_runtime.py: SOURCE_LAYERS_LABEL); the source digest labels it.
LABEL org.kiln.source-layers="2"
COPY stages /work/stages
RUN PYTHONDONTWRITEBYTECODE='' python -c 'import stages.convert, stages.quantize, stages.report, stages.smoke, stages.evaluate'
ARG KILN_SOURCE=unknown
LABEL org.kiln.source="${KILN_SOURCE}"
USER ${UID}:${GID}
ENTRYPOINT []
CMD ["python", "-m", "stages.convert", "--help"]
