"""Tokenisation of validated examples: truncation that keeps the response, prompt and responses rendered as
training sees them, and the tokenised dataset."""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import torch

from mmalign.text.data.prompts import as_messages
from mmalign.text.data.schema import PreferenceExample, Text

__all__ = ["truncate_prompt", "truncate_pair", "PreferenceTokenizer", "TokenizedPreferenceDataset"]


def truncate_prompt(prompt_ids: list[int], keep: int, *, keep_first_token: bool = False) -> list[int]:
    """The last ``keep`` tokens of a prompt (``keep`` >= 1). With ``keep_first_token`` a cut prompt keeps its first
    token (a BOS or other leading special token the model always saw at position 0) and drops tokens after it."""
    if len(prompt_ids) <= keep:
        return list(prompt_ids)
    if keep_first_token and keep >= 2:
        return [prompt_ids[0]] + list(prompt_ids[len(prompt_ids) - keep + 1:])
    return list(prompt_ids[-keep:])


def truncate_pair(
    prompt_ids: list[int],
    responses: list[list[int]],
    *,
    max_prompt_length: int,
    max_response_length: int,
    max_length: Optional[int] = None,
    keep_first_token: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """Truncation that keeps the response: responses keep their first ``max_response_length`` tokens, the prompt
    its last ``max_prompt_length``; then, if prompt + longest response exceeds ``max_length``, the prompt is cut
    from the left first (keeping >= 1 token, which predicts the first response token), then the responses.
    ``keep_first_token``: see :func:`truncate_prompt` (set when the prompt starts with a special token)."""
    responses = [r[:max_response_length] for r in responses]
    prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, keep_first_token=keep_first_token)
    if max_length is not None:
        longest = max(len(r) for r in responses)
        if len(prompt_ids) + longest > max_length:
            keep = max(1, max_length - longest)
            prompt_ids = truncate_prompt(prompt_ids, keep, keep_first_token=keep_first_token)
            room = max_length - len(prompt_ids)
            responses = [r[:room] for r in responses]
    return prompt_ids, responses


class PreferenceTokenizer:
    """Turns :class:`PreferenceExample` s into token ids: ``prompt_ids`` (never scored) and the responses' ids.

    Plain text: the prompt is tokenised with the tokenizer's special tokens (e.g. BOS), each response without
    them and followed by EOS. Messages: prompt = chat template with the generation prompt; response = the
    rest of the templated conversation (its end-of-turn tokens included). ``use_chat_template`` also renders
    plain-text prompts (HH dialogues split into turns) as chat messages, for instruction-tuned models.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_prompt_length: int = 512,
        max_response_length: int = 512,
        max_length: Optional[int] = None,
        use_chat_template: bool = False,
        system_prompt: Optional[str] = None,
    ):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.max_length = max_length
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one (responses end with EOS)")

    def as_messages(self, prompt: Text) -> list[dict[str, str]]:
        return as_messages(prompt, self.system_prompt)

    def _render_chat(self, prompt_messages: list, response: Text, row: int) -> tuple[str, str]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise ValueError(f"row {row}: conversational data needs a chat template, and the tokenizer has none; set "
                             "model.chat_template")
        response_messages = [{"role": "assistant", "content": response.strip()}] if isinstance(response, str) else list(response)
        prompt_text = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(prompt_messages + response_messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"row {row}: the chat template does not render the prompt (with the generation prompt) as a prefix "
                "of the full conversation, so the response tokens cannot be located; use a template without this "
                "behaviour (model.chat_template)"
            )
        return prompt_text, full_text[len(prompt_text):]

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def __call__(self, examples: Sequence[PreferenceExample]) -> list[dict[str, Any]]:
        tok = self.tokenizer
        prompts, responses, chat_flags = [], [], []
        for ex in examples:
            members = ex.chosen + ex.rejected
            chat = self.use_chat_template or not isinstance(ex.prompt, str) or any(not isinstance(m, str) for m in members)
            chat_flags.append(chat)
            if chat:
                messages = self.as_messages(ex.prompt)
                rendered = [self._render_chat(messages, m, ex.row) for m in members]
                prompts.append(rendered[0][0])
                responses.append([r for _, r in rendered])
            else:
                prompts.append(ex.prompt)
                responses.append(list(members))
        # Batched calls: one per kind (fast tokenizers parallelise internally).
        plain_prompts = [p for p, c in zip(prompts, chat_flags) if not c]
        chat_prompts = [p for p, c in zip(prompts, chat_flags) if c]
        plain_prompt_ids = iter(self._encode(plain_prompts, True) if plain_prompts else [])
        chat_prompt_ids = iter(self._encode(chat_prompts, False) if chat_prompts else [])
        flat_responses = [r for rs in responses for r in rs]
        flat_ids = iter(self._encode(flat_responses, False) if flat_responses else [])
        start_token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        special_ids = set(tok.all_special_ids)
        out = []
        for ex, chat, rs in zip(examples, chat_flags, responses):
            prompt_ids = list(next(chat_prompt_ids) if chat else next(plain_prompt_ids))
            if not prompt_ids:
                # The first response token must be predicted from something.
                prompt_ids = [start_token]
            member_ids = []
            for _ in rs:
                ids = list(next(flat_ids))
                if not chat:
                    ids.append(tok.eos_token_id)
                member_ids.append(ids)
            if any(len(ids) == 0 for ids in member_ids):
                raise ValueError(f"row {ex.row}: a response tokenises to zero tokens")
            prompt_ids, member_ids = truncate_pair(
                prompt_ids, member_ids, max_prompt_length=self.max_prompt_length,
                max_response_length=self.max_response_length, max_length=self.max_length,
                keep_first_token=prompt_ids[0] in special_ids,
            )
            k = len(ex.chosen)
            out.append({
                "prompt_ids": prompt_ids,
                "chosen_ids": member_ids[:k],
                "rejected_ids": member_ids[k:],
                "row": ex.row,
                "extra": dict(ex.extra),
            })
        return out


class TokenizedPreferenceDataset(torch.utils.data.Dataset):
    """Tokenised examples (dicts with prompt_ids, chosen_ids, rejected_ids, row, extra; optionally
    ref_chosen/ref_rejected after reference precomputation)."""

    def __init__(self, items: list[dict[str, Any]], *, source: str = "<data>", data_format: str = "pairs"):
        self.items = items
        self.source = source
        self.data_format = data_format

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def max_group_sizes(self) -> tuple[int, int]:
        return (max(len(i["chosen_ids"]) for i in self.items), max(len(i["rejected_ids"]) for i in self.items))

    def fingerprint(self) -> str:
        """sha256 of every token id (prompt, members, order): keys caches on exactly what the model sees."""
        digest = hashlib.sha256()
        for item in self.items:
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                value = item[key]
                seqs = value if key != "prompt_ids" else [value]
                digest.update(key.encode())
                for seq in seqs:
                    digest.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
                    digest.update(b"|")
        return digest.hexdigest()
