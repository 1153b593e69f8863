"""Chat template: OpenAI-style messages -> one prompt string for a base GPT, plus the stop strings.

    from gptcore.chat import render, stop_strings
    prompt = render([{"role": "user", "content": "Hi"}])   # "User: Hi\nAssistant:"
    engine.generate([prompt], SamplingParams(stop=stop_strings()))

A raygpt model is a plain next-token predictor, so a conversation is written out as text with one
role prefix per turn and the model continues after the final "Assistant:" prefix. Generation must
stop when the model starts writing the next turn: `stop_strings()` lists those turn openings.
`render_sft(messages)` splits a conversation into (prompt, completion) for supervised fine-tuning
with the same layout, so a fine-tuned model sees at serving time exactly what it was trained on.

Templates: "plain" (default; "System:/User:/Assistant:" lines, works with any tokenizer) and
"chatml" (<|im_start|>role ... <|im_end|>; only useful when the tokenizer has those special tokens).

Does not: tokenize, call a model, or know about HTTP (pipelines.serve maps ChatTemplateError to 400).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gptcore.errors import GPTError


class ChatTemplateError(GPTError):
    """The messages cannot be rendered; the message names the offending field (e.g. messages[1].role)."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    role_prefix: Mapping[str, str]  # text written before a turn's content, per role
    turn_end: str  # text written after a turn's content
    generation_prompt: str  # opening of the assistant turn the model is asked to write
    stop: tuple[str, ...]  # strings that mean "the assistant turn is over"


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(
        name="plain",
        role_prefix={"system": "System: ", "user": "User: ", "assistant": "Assistant: "},
        turn_end="\n",
        # no trailing space: BPE vocabularies usually merge the space into the next word (" Hello")
        generation_prompt="Assistant:",
        stop=("\nUser:", "\nSystem:", "\nAssistant:"),
    ),
    "chatml": ChatTemplate(
        name="chatml",
        role_prefix={"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
                     "assistant": "<|im_start|>assistant\n"},
        turn_end="<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
        stop=("<|im_end|>", "<|im_start|>"),
    ),
}

# OpenAI's "developer" role is the newer name of "system"
_ROLE_ALIASES = {"developer": "system"}
_SUPPORTED_ROLES = ("system", "developer", "user", "assistant")


def get_template(name: str = "plain") -> ChatTemplate:
    if name not in TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': '...'}}, got {kind!r}; "
                    f"this model reads text only")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatTemplateError(f"{where}.content must be a string or a list of text parts, "
                            f"got {type(content).__name__}")


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Validate messages and return (role, text) pairs with role aliases resolved."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} objects, "
                                f"got {type(messages).__name__}")
    out: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role not in _SUPPORTED_ROLES:  # (no non-str is supported)
            raise ChatTemplateError(f"{where}.role must be one of {list(_SUPPORTED_ROLES)}, got {role!r}"
                                    + ("; tool calls are not supported by this model" if role in ("tool", "function")
                                       else ""))
        content = m.get("content")
        if content is None:
            if role == "assistant":
                content = ""  # OpenAI allows an assistant turn without content (tool calls)
            else:
                raise ChatTemplateError(f"{where}.content is required for role {role!r}")
        out.append((_ROLE_ALIASES.get(role, role), _content_text(content, where)))
    if not out:
        raise ChatTemplateError("messages must hold at least one message, got an empty list")
    return out


def render(messages: Iterable[Mapping[str, Any]], template: str | ChatTemplate = "plain",
           add_generation_prompt: bool = True) -> str:
    """Messages -> prompt text. With add_generation_prompt the text ends with the assistant opening."""
    t = get_template(template) if isinstance(template, str) else template
    pairs = normalize_messages(messages)
    text = "".join(t.role_prefix[role] + content + t.turn_end for role, content in pairs)
    if add_generation_prompt:
        text += t.generation_prompt
    return text


def stop_strings(template: str | ChatTemplate = "plain") -> tuple[str, ...]:
    """Strings that end the assistant's turn (pass them as SamplingParams.stop)."""
    return (get_template(template) if isinstance(template, str) else template).stop


def render_sft(messages: Iterable[Mapping[str, Any]], template: str | ChatTemplate = "plain") -> tuple[str, str]:
    """Split a conversation ending with an assistant turn into (prompt, completion) for fine-tuning.

    prompt = everything up to and including the final generation prompt; completion = the last
    assistant turn's content plus the turn end, so the model learns to close its turn."""
    t = get_template(template) if isinstance(template, str) else template
    pairs = normalize_messages(messages)
    if pairs[-1][0] != "assistant":
        raise ChatTemplateError(f"render_sft needs the last message to be the assistant's, got role "
                                f"{pairs[-1][0]!r}; append the target assistant message")
    history = [{"role": r, "content": c} for r, c in pairs[:-1]]
    prompt = (render(history, t, add_generation_prompt=True) if history else t.generation_prompt)
    completion = pairs[-1][1]
    if t.name == "plain":
        # the plain prompt ends with "Assistant:"; the content follows after one space
        completion = " " + completion
    return prompt, completion + t.turn_end
