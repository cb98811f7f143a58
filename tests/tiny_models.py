"""Tiny real models for tests: a randomly initialised Mistral with a SentencePiece tokenizer
trained here, on text written here. Nothing is downloaded."""

from __future__ import annotations

import io
import random
from pathlib import Path

WORDS = (
    "the model learns to answer questions about dates numbers colours animals and places "
    "quantization merges adapters into weights and converts them for llama cpp to run fast "
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9"
).split()

# Llama-2 / Mistral-Instruct chat template (the reference model's own, with [INST] ... [/INST]).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n_lines)]


def train_sentencepiece(out_dir: Path, vocab_size: int = 320) -> Path:
    """A BPE SentencePiece model with Llama's special ids (unk 0, bos 1, eos 2), like Mistral's."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        split_digits=True,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def build_tiny_mistral(out_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write an HF checkpoint (safetensors + SentencePiece tokenizer + chat template) to out_dir."""
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(out_dir)
    # legacy=True: a space after control tokens, as Mistral-7B-Instruct v0.1/v0.2 (tokenizer v1) and
    # llama.cpp tokenize "<s>[INST]" (mistral-common: "<s> [INST] user message [/INST]").
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, legacy=True, add_bos_token=True, add_eos_token=False)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # Wide init: behind a fixed RMSNorm and lm_head, std 0.02 caps the logits near uniform, so
        # LoRA could not move the loss much; 0.3 leaves room to learn.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
