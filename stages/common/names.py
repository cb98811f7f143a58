"""Every name the stages, tasks and tests share: stage names, artifact folders, manifest keys.

Nothing here computes anything; a string that two files would otherwise both spell lives here.
"""

from __future__ import annotations

PROJECT = "kiln"

# Stage names; specs.py declares each stage (order, inputs, image).
PREPARE = "prepare"
TRAIN = "train"
MERGE = "merge"
CONVERT = "convert"
QUANTIZE = "quantize"
REPORT = "report"
SMOKE = "smoke"
EVALUATE = "evaluate"

# Folders and files inside runs/<run-name>/.
RUNS_DIR = "runs"
CACHE_DIR = "cache"
DATA_DIR = "data"  # the user's own data files; containers see it read-only
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
GGUF_DIR = "gguf"
EVAL_DIR = "eval"
LOGS_DIR = "logs"
MANIFESTS_DIR = "manifests"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_LOG = "training_log.json"
RUN_CONFIG = "config.yaml"
SPLIT_FILE = "split.json"  # the train stage's split, by row hashes (heldout.py)
TENSORBOARD_DIR = "tensorboard"  # event files while training, with training.report_to=tensorboard
LOSS_CURVE_PNG = "loss_curve.png"  # train and eval loss against step, beside summary.md
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
TMP_PREFIX = ".tmp-"

# Manifest keys.
M_STAGE = "stage"
M_STATUS = "status"
M_INPUTS = "inputs"
M_OUTPUTS = "outputs"
M_METRICS = "metrics"
M_VERSIONS = "versions"
M_DURATION = "duration_s"
M_STARTED = "started_at"
M_COMMAND = "command"
M_SHA256 = "sha256"
M_SIZE = "size"
M_LLAMA_CPP = "llama_cpp"
M_PRUNED = "pruned"  # outputs removed after their consumers ran (specs.Intermediate)

# GGUF.
DEFAULT_OUTTYPE = "f16"
DEFAULT_QUANT_TYPES = ("Q4_K_M",)


# Environment variables that the stages read.
ENV_CACHE = "KILN_CACHE"
ENV_LLAMA_CPP = "KILN_LLAMA_CPP"

# llama-quantize types the quantize stage accepts, with their nominal bits per weight
# (llama.cpp's own table in tools/quantize). Extend here to allow another type.
QUANT_TYPES: dict[str, float] = {
    "Q2_K": 2.96,
    "Q3_K_M": 3.91,
    "Q4_0": 4.34,
    "Q4_K_S": 4.58,
    "Q4_K_M": 4.89,
    "Q5_K_S": 5.54,
    "Q5_K_M": 5.70,
    "Q6_K": 6.56,
    "Q8_0": 8.50,
}
SMOKE_FILE = "smoke.json"
EXACT_MATCH_FILE = "exact_match.json"

# Files the convert, quantize and report stages write next to the GGUFs in gguf/.
LORA_KIND = "lora.f16"  # RunLayout.gguf(LORA_KIND): the adapter as a LoRA GGUF
IMATRIX_FILE = "imatrix.gguf"
PARITY_FILE = "chat_parity.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
MODELFILE = "Modelfile"
MODEL_CARD = "README.md"
