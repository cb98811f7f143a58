"""Ollama TEMPLATE derivation, isolated: the turns cut from a chat template must re-render every
conversation exactly as the template itself does, for the template families in common use.

The templates below are the real ones of their model families (abridged where a branch is for
tools). Rendering uses jinja2 the way transformers does (sandboxed, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stages.common.chat_template import Turns, derive_turns, modelfile, ollama_template
from stages.common.errors import StageError

CHATML_DEFAULT_SYSTEM = (  # SmolLM2-Instruct: ChatML with a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_V1 = (  # Mistral-7B-Instruct v0.1: no system role
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V2_SYSTEM = (  # Mistral-7B-Instruct v0.2 (later revision): system text joined to the first user turn
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NUMBERED = (  # renders turns differently by position: not expressible as constant turns
    "{% for message in messages %}{{ loop.index }}. {{ message['content'] }}\n{% endfor %}"
)


def renderer(template: str, bos: str = "<s>", eos: str = "</s>"):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages, add_generation_prompt=True):
        return compiled.render(
            messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt
        )

    return render


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say it in French.\nOnly French."},
    ],
    [
        {"role": "system", "content": "You rewrite dates."},
        {"role": "user", "content": "March 7, 2021"},
        {"role": "assistant", "content": "2021-03-07"},
        {"role": "user", "content": "7 Jan 1999"},
    ],
]


@pytest.mark.parametrize(
    ("template", "bos", "has_system"),
    [
        (CHATML_DEFAULT_SYSTEM, "", True),
        (MISTRAL_V1, "<s>", False),
        (MISTRAL_V2_SYSTEM, "<s>", True),
        (LLAMA3, "<|begin_of_text|>", True),
    ],
    ids=["chatml-default-system", "mistral-v1", "mistral-v2-system", "llama3"],
)
def test_derived_turns_render_every_conversation_as_the_template(template, bos, has_system):
    render = renderer(template, bos=bos or "<s>")
    turns = derive_turns(render, bos)
    assert (turns.system_pre is not None) is has_system
    for messages in CONVERSATIONS:
        if messages[0]["role"] == "system" and not has_system:
            with pytest.raises(StageError, match="no place for a system message"):
                turns.render(messages)
            continue
        want = render(messages)
        assert turns.render(messages) == (want[len(bos) :] if bos else want), messages


def test_chatml_default_system_is_kept_when_no_system_message_is_given():
    turns = derive_turns(renderer(CHATML_DEFAULT_SYSTEM), "")
    assert turns.first_user.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert turns.system_pre == "<|im_start|>system\n"
    assert turns.user_to_assistant == turns.generation_prompt == "<|im_end|>\n<|im_start|>assistant\n"


def test_mistral_v2_answer_space_belongs_to_the_history_only():
    turns = derive_turns(renderer(MISTRAL_V2_SYSTEM), "<s>")
    assert (turns.user_to_assistant, turns.generation_prompt) == (" [/INST] ", " [/INST]")


def test_a_template_that_numbers_its_turns_is_refused():
    with pytest.raises(StageError, match="cannot be derived"):
        derive_turns(renderer(NUMBERED), "")


def test_go_template_escapes_braces_and_keeps_newlines():
    turns = Turns(
        first_user="{{user}}\n", user_to_assistant="\nA: ", assistant_to_user="\n\n", generation_prompt="\nA:"
    )
    text = ollama_template(turns)
    assert '{{ "{{" }}user}}\n' in text  # a literal "{{" cannot start an action
    assert "{{-" not in text and "-}}" not in text  # no trimming: it would eat the turns' newlines
    assert 'eq .Role "system"' not in text  # the template drops system messages
    assert text.endswith("{{ end }}\nA:")  # the generation prompt after the last message


def test_modelfile_lists_stops_and_system_prompt():
    turns = derive_turns(renderer(CHATML_DEFAULT_SYSTEM), "")
    text = modelfile("run.Q4_K_M.gguf", turns, ["<|im_end|>", "<|endoftext|>"], 'Say "ok".')
    lines = text.splitlines()
    assert lines[0] == "FROM ./run.Q4_K_M.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert lines[-1] == 'SYSTEM """Say "ok"."""'
    # No SYSTEM line for a template without a system role: Ollama would inject a message it cannot render.
    v1 = derive_turns(renderer(MISTRAL_V1), "<s>")
    assert "SYSTEM" not in modelfile("run.gguf", v1, ["</s>"], "Be brief.")
