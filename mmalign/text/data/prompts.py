"""Prompt rendering: HH dialogues split into prompt and responses, prompts as chat messages, and the prompt text a
model is sampled from (rendered exactly as training tokenises it)."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["HH_HUMAN", "HH_ASSISTANT", "split_implicit_prompt", "split_hh_dialogue", "hh_prompt_to_messages", "as_messages", "render_prompt"]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

Text = Any  # str, or a list of messages


def split_hh_dialogue(
    text: str, *, row: int | None = None, field: str | None = None, source: str | None = None
) -> tuple[str, str]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a"`` -> (``"\\n\\nHuman: q\\n\\nAssistant:"``, ``" a"``): the prompt ends
    with the last assistant marker, the response is the rest.

    ``row`` (1-based), ``field`` and ``source`` only enrich the ValueError raised for a non-string or a dialogue
    without an assistant turn.
    """
    context = "".join(
        part for part in (
            f"{source}: " if source is not None else "",
            f"row {row}: " if row is not None else "",
            f"field {field!r}: " if field is not None else "",
        )
    )
    if not isinstance(text, str):
        raise ValueError(f"{context}expected a string dialogue, got {type(text).__name__}")
    index = text.rfind(HH_ASSISTANT)
    if index < 0:
        raise ValueError(f"{context}no '\\n\\nAssistant:' turn")
    cut = index + len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit-prompt rows: ``{chosen, rejected}`` full texts whose common prefix is the prompt. Returns
    ``(prompt, chosen response, rejected response)``; a cut just after whitespace moves back one character so
    the responses keep their leading space (as HH responses do). ValueError when there is no common prefix or a
    response would be empty."""
    cut = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        cut += 1
    if cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    if cut == 0:
        raise ValueError("chosen and rejected share no prefix, so no prompt can be read from them; give a prompt "
                         "column")
    if cut == len(chosen) or cut == len(rejected):
        raise ValueError("one text is a prefix of the other, so its response would be empty; give a prompt column")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def hh_prompt_to_messages(prompt: str) -> list[dict[str, str]]:
    """An HH prompt (``…\\n\\nAssistant:``) as chat messages: Human -> user, Assistant -> assistant."""
    import re

    body = prompt[: -len(HH_ASSISTANT)] if prompt.endswith(HH_ASSISTANT) else prompt
    parts = re.split(r"\n\n(Human|Assistant):", body)
    messages = []
    # parts = [preamble, role, text, role, text, ...]
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def as_messages(prompt: Text, system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """A prompt as chat messages: HH dialogues split into turns, other text as one user message, messages kept;
    ``system_prompt`` is prepended unless the conversation already starts with a system message."""
    if isinstance(prompt, str):
        messages = hh_prompt_to_messages(prompt) if HH_ASSISTANT in prompt or prompt.startswith(HH_HUMAN) else (
            [{"role": "user", "content": prompt.strip()}]
        )
    else:
        messages = list(prompt)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_prompt(tokenizer, prompt: Text, *, use_chat_template: bool, system_prompt: Optional[str] = None) -> tuple[str, bool]:
    """The prompt text a model is sampled from, rendered exactly as :class:`PreferenceTokenizer` renders it for
    training; returns ``(text, add_special_tokens)`` (False for chat-rendered text, which holds its own BOS).

    Plain text without ``use_chat_template`` is returned as is; otherwise the chat template with the generation
    prompt renders :func:`as_messages` (HH dialogues split into user/assistant turns).
    """
    if not use_chat_template and isinstance(prompt, str):
        return prompt, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat-formatted prompts need a chat template, and the tokenizer has none; set model.chat_template")
    messages = as_messages(prompt, system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False

