# Train image: CUDA torch wheels from PyPI (they carry the CUDA runtime: the host needs only the
# NVIDIA driver and nvidia-container-toolkit), bitsandbytes, peft, trl, accelerate, datasets,
# transformers. Runs the train stage on a GPU, or on the CPU (bitsandbytes' CPU backend).
#   docker build -f images/train.Dockerfile -t kiln-train .            (invoke build --stage train)
# Build args: BASE_IMAGE, UID, GID. Optional CA secret: as in merge.Dockerfile.
# tensorboard: event files under runs/<run>/tensorboard with training.report_to=tensorboard.
# NVIDIA_DRIVER_CAPABILITIES: what the container toolkit mounts from the host driver (CUDA, nvidia-smi).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG UID=10001
ARG GID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/work/cache/hf \
    TRITON_CACHE_DIR=/tmp/triton \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN set -eux; \
    groupadd --gid "${GID}" kiln; \
    useradd --uid "${UID}" --gid kiln --no-create-home --home-dir /tmp kiln; \
    python3 -m venv /opt/venv; \
    mkdir -p /work; \
    python3 --version

# The last smoke test leaves .pyc files for the modules the train stage imports: see merge.Dockerfile.
COPY requirements/constraints.txt /opt/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --no-compile -c /opt/constraints.txt torch transformers peft trl accelerate datasets bitsandbytes \
        safetensors sentencepiece protobuf pydantic pyyaml rich psutil liger-kernel tensorboard; \
    python -c 'import torch, bitsandbytes, peft, trl, accelerate, datasets, liger_kernel, tensorboard; assert torch.version.cuda, torch.__version__'; \
    PYTHONDONTWRITEBYTECODE='' python -c 'import datasets, peft.tuners.lora, safetensors.torch; \
        import transformers.models.llama.modeling_llama, transformers.models.mistral.modeling_mistral; \
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig; from trl import SFTConfig, SFTTrainer; \
        from torch.utils.tensorboard import SummaryWriter'

WORKDIR /work
# The last two layers hold the code (docker_runtime.py: SOURCE_LAYERS_LABEL); the source digest labels it.
LABEL org.kiln.source-layers="2"
COPY stages /work/stages
RUN PYTHONDONTWRITEBYTECODE='' python -c 'import stages.train'
ARG KILN_SOURCE=unknown
LABEL org.kiln.source="${KILN_SOURCE}"
USER ${UID}:${GID}
ENTRYPOINT []
CMD ["python", "-m", "stages.train", "--help"]
