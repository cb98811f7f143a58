"""The model's chat template, checked and carried over: HF ↔ GGUF token parity, and an Ollama
TEMPLATE derived from the template itself.

Parity. The most common fine-tune → GGUF failure is a model that answers differently in llama.cpp
because its prompt is not the one it was trained on: another template, a double BOS, a lost space
after a control token. `check_parity` compares, for a fixed set of conversations, the token ids of
HF ``apply_chat_template(..., add_generation_prompt=True)`` with llama.cpp's tokenization of the
same conversation rendered through the template stored in the GGUF, and the special-token
metadata (EOS, BOS, add_bos) of both.

Ollama. Ollama wants a Go template, not Jinja. Rather than a table of known models, the template
is derived by rendering the model's own Jinja template on conversations with sentinel contents and
cutting the output at the sentinels: what comes before the system text, between the system text
and the first user text, between a user text and the assistant's, and so on. Any template that
renders each turn the same way whatever its content (every chat template in common use) is
reproduced exactly for system?-user-(assistant-user)* conversations; `derive_turns` checks that on
a conversation of a different shape and refuses a template it cannot reproduce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from stages.common.errors import StageError

Messages = list[dict[str, str]]

# Sentinels: text no template transforms (no spaces to strip, no case to change, no markup).
SYS, U1, A1, U2, A2, U3 = (f"KILNSENTINEL{i}X" for i in range(6))


# --- Parity ------------------------------------------------------------------------------------


def hf_special_tokens(tok) -> dict[str, Any]:
    """EOS/BOS ids and whether the HF tokenizer prepends BOS to plain text."""
    probe = tok("a", add_special_tokens=True).input_ids
    bos = tok.bos_token_id
    return {"eos_token_id": tok.eos_token_id, "bos_token_id": bos, "add_bos": bos is not None and probe[:1] == [bos]}


def check_parity(merged_dir: Path, model, conversations: list[Messages]) -> dict[str, Any]:
    """Compare HF's chat-template tokens with llama.cpp's for each conversation, and the special
    tokens; StageError naming the first difference. `model` is an open gguf_runtime.GGUFModel."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    hf = hf_special_tokens(tok)
    gguf = {
        "eos_token_id": model.metadata_int("tokenizer.ggml.eos_token_id"),
        "bos_token_id": model.metadata_int("tokenizer.ggml.bos_token_id"),
        "add_bos": model.add_bos,
    }
    for key, want in hf.items():
        # A model without BOS may still name one in its vocab; only compare what HF defines.
        if want is not None and gguf[key] != want:
            raise StageError(
                f"GGUF {key} is {gguf[key]}, the merged HF tokenizer's is {want}; the converted model "
                "would start or stop differently. Check tokenizer_config.json / generation_config.json in merged/"
            )
    checked = []
    for messages in conversations:
        want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        got = model.prompt_tokens(model.chat_prompt(messages))
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            raise StageError(
                f"chat template parity: llama.cpp tokenizes {messages[-1]['content'][:40]!r} differently from HF "
                f"from token {at} on: GGUF {got[at : at + 4]} ({model.detokenize(got[at : at + 4])!r}) vs HF "
                f"{want[at : at + 4]} ({tok.decode(want[at : at + 4])!r}); the deployed model would see another prompt"
            )
        bos = hf["bos_token_id"]
        n_bos = sum(1 for t in got[:2] if t == bos) if bos is not None else 0
        if n_bos > 1:
            raise StageError(f"chat template parity: the prompt starts with {n_bos} BOS tokens; expected one")
        checked.append({"messages": messages, "tokens": len(got), "bos": n_bos})
    return {"hf": hf, "gguf": gguf, "conversations": checked}


# --- Ollama ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turns:
    """The constant text around each turn of a chat template (see the module docstring)."""

    first_user: str  # before the first user text when there is no system message
    user_to_assistant: str  # between a user text and the assistant's answer, in the history
    assistant_to_user: str  # between an answer and the next user text
    generation_prompt: str  # after the last user text, where the answer starts
    system_pre: str | None = None  # before the system text; None: the template drops system messages
    system_to_user: str = ""  # between the system text and the first user text

    def render(self, messages: Messages) -> str:
        """`messages` as the template renders them, with the generation prompt."""
        out, prev = [], ""
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                if self.system_pre is None:
                    raise StageError("this chat template has no place for a system message")
                out.append(self.system_pre + content + self.system_to_user)
            elif role == "user":
                out.append({"": self.first_user, "assistant": self.assistant_to_user}.get(prev, "") + content)
            else:
                out.append(self.user_to_assistant + content)
            prev = role
        return "".join(out) + self.generation_prompt


def _between(text: str, start: str | None, end: str | None) -> str:
    i = text.index(start) + len(start) if start else 0
    j = text.index(end, i) if end else len(text)
    return text[i:j]


def derive_turns(render, bos_text: str = "") -> Turns:
    """Cut the template's output at sentinel contents. `render(messages)` renders with the
    generation prompt; `bos_text`, when the runtime adds BOS itself, is dropped from the front."""

    def strip_bos(text: str) -> str:
        return text[len(bos_text) :] if bos_text and text.startswith(bos_text) else text

    def safe_render(messages: Messages) -> str:
        try:
            return strip_bos(render(messages))
        except Exception:  # a template's raise_exception() for roles it refuses
            return ""

    chat = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]
    no_system = safe_render(chat)
    with_system = safe_render([{"role": "system", "content": SYS}, *chat])
    if not all(s in no_system for s in (U1, A1, U2)):
        raise StageError("the chat template does not render a plain user/assistant conversation; cannot derive turns")
    turns = Turns(
        first_user=_between(no_system, None, U1),
        user_to_assistant=_between(no_system, U1, A1),
        assistant_to_user=_between(no_system, A1, U2),
        generation_prompt=_between(no_system, U2, None),
    )
    if SYS in with_system and with_system.index(SYS) < with_system.index(U1):
        turns = replace(
            turns, system_pre=_between(with_system, None, SYS), system_to_user=_between(with_system, SYS, U1)
        )
    # Check on a longer conversation without a system message, which the cuts above did not see.
    probe = [
        *([{"role": "system", "content": SYS}] if turns.system_pre is not None else []),
        {"role": "user", "content": U1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": U2},
        {"role": "assistant", "content": A2},
        {"role": "user", "content": U3},
    ]
    if strip_bos(render(probe)) != turns.render(probe):
        raise StageError(
            "the chat template does not render every turn the same way (it depends on the turn's position "
            "or content); an Ollama TEMPLATE cannot be derived from it (write one by hand next to the GGUF)"
        )
    return turns


def _go_literal(text: str) -> str:
    """Text for a Go template: literal except for the action delimiters."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(turns: Turns) -> str:
    """A Go template (Ollama's TEMPLATE) that renders .Messages as `turns.render` does. One line,
    no whitespace-trimming actions: a trim would eat the newlines many templates end turns with."""
    t = {k: _go_literal(v) for k, v in asdict(turns).items() if v is not None}
    system = (
        '{{ if eq .Role "system" }}' + t["system_pre"] + "{{ .Content }}" + t["system_to_user"] + "{{ else "
        if "system_pre" in t
        else "{{ "
    )
    user = (
        'if eq .Role "user" }}{{ if eq $prev "" }}'
        + t["first_user"]
        + '{{ else if eq $prev "assistant" }}'
        + t["assistant_to_user"]
        + "{{ end }}{{ .Content }}"
    )
    assistant = '{{ else if eq .Role "assistant" }}' + t["user_to_assistant"] + "{{ .Content }}{{ end }}"
    loop = '{{ $prev := "" }}{{ range .Messages }}' + system + user + assistant + "{{ $prev = .Role }}{{ end }}"
    return loop + t["generation_prompt"]


def _quote(text: str) -> str:
    """A Modelfile string: triple-quoted when it spans lines, else a JSON-style quoted one."""
    if '"""' in text:
        raise StageError('a Modelfile value cannot contain """; write the Modelfile by hand')
    return f'"""{text}"""' if "\n" in text or '"' in text else f'"{text}"'


def modelfile(gguf_file: str, turns: Turns, stops: list[str], system: str | None) -> str:
    """An Ollama Modelfile next to the GGUF: FROM, TEMPLATE, stop parameters, SYSTEM."""
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{ollama_template(turns)}"""']
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    if system and turns.system_pre is not None:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"
