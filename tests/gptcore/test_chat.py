"""gptcore.chat: messages -> prompt text, stop strings, SFT split, and clear errors.

    .venv/bin/python -m pytest tests/gptcore/test_chat.py -q
"""

from __future__ import annotations

import pytest

from gptcore.chat import ChatTemplateError, get_template, render, render_sft, stop_strings


def test_plain_template_layout_and_generation_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert render(msgs) == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert render(msgs, add_generation_prompt=False).endswith("User: Bye\n")
    # the model's next turn opening is a stop string, so generation ends with the assistant's turn
    assert "\nUser:" in stop_strings()


def test_content_parts_developer_alias_and_chatml():
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q"}]
    assert render(msgs).startswith("System: ab\n")
    assert render(msgs, "chatml") == ("<|im_start|>system\nab<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    assert stop_strings("chatml")[0] == "<|im_end|>"


@pytest.mark.parametrize("msgs, fragment", [
    ([], "at least one message"),
    ("hello", "list"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content is required"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
    (["hi"], "messages[0] must be an object"),
])
def test_invalid_messages_name_the_field(msgs, fragment):
    with pytest.raises(ChatTemplateError, match=None) as ei:
        render(msgs)
    assert fragment in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_render_sft_splits_prompt_and_completion_consistently_with_render():
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    prompt, completion = render_sft(msgs)
    assert prompt == render(msgs[:1])  # what the server sends at inference time
    assert completion == " 4\n"
    assert prompt + completion == render(msgs, add_generation_prompt=False)
    with pytest.raises(ChatTemplateError, match="last message"):
        render_sft(msgs[:1])


def test_unknown_template():
    with pytest.raises(ChatTemplateError, match="unknown chat template"):
        get_template("llama")
