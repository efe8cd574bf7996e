"""Chat templates: a conversation -> ``input_ids`` and ``labels`` with only the assistant's tokens trained.

``build_chat_template(name, tokenizer)`` returns one of:

- ``"chatml"`` (Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.
- ``"llama3"``: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.
- ``"tokenizer"``: the tokenizer's own Jinja ``chat_template`` through transformers' ``apply_chat_template``.

In every template the trained tokens of an assistant turn are its content and its end-of-turn token (so the
model learns to stop); the role header, system and user turns, and the newline after an end-of-turn token are
not trained. Messages are ``{"role": "system"|"user"|"assistant", "content": str}``; any number of turns, an
optional system prompt first. Other roles (``tool``) are refused, and so are other keys with a value
(``tool_calls``, ``reasoning_content``, ...) in ``"chatml"`` and ``"llama3"``, which would drop them; ``"tokenizer"``
passes whole messages to the tokenizer's template.

A custom template subclasses ``ChatTemplate`` and implements ``encode_messages`` and ``get_jinja_template``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from veofast.data.records import BadRecordError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
EMPTY = (None, "", [], {})  # message values that hold nothing (Parquet gives None for absent struct fields)


def check_messages(messages: Sequence[dict]) -> None:
    """``BadRecordError`` naming the first malformed message, or when no assistant turn exists."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecordError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise BadRecordError(f"messages[{i}]['role'] must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise BadRecordError(f"messages[{i}]['content'] must be a string, got {message.get('content')!r:.80}")
        if message["role"] == "system" and i != 0:
            raise BadRecordError(f"messages[{i}]: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecordError("the conversation has no assistant message: nothing to train on")


class ChatTemplate(ABC):
    """Turns a conversation into a training sample. Subclass it for a custom format."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def encode_messages(self, messages: Sequence[dict[str, str]], max_seq_len: int = 8192) -> dict[str, list[int]]:
        """``{"input_ids": list[int], "labels": list[int]}`` of equal length <= ``max_seq_len``, labels -100 except
        on assistant tokens (unshifted). Raises ``BadRecordError`` for malformed messages."""

    @abstractmethod
    def get_jinja_template(self) -> str:
        """The same format as a Jinja chat template (e.g. to save with the tokenizer for inference)."""


class SegmentTemplate(ChatTemplate):
    """A template written as text segments, each tokenized on its own and trained or not.

    Subclasses give the special tokens they need and ``segments(messages)``; the tokenizer must know every
    special token as one token, which is checked when the template is built.
    """

    special_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        for token in self.special_tokens:
            ids = tokenizer.encode(token, add_special_tokens=False)
            if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
                raise ValueError(
                    f"chat template {type(self).__name__}: the tokenizer has no special token {token!r} "
                    "(add it to the tokenizer, or use build_chat_template('tokenizer', tokenizer))"
                )
        self._cache: dict[str, list[int]] = {}

    @abstractmethod
    def segments(self, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, trained)`` pieces, in order."""

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)  # headers and end tokens repeat in every conversation
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(text) <= 64 and len(self._cache) < 4096:
                self._cache[text] = ids
        return ids

    def encode_messages(self, messages: Sequence[dict[str, str]], max_seq_len: int = 8192) -> dict[str, list[int]]:
        check_messages(messages)
        for i, message in enumerate(messages):  # rendered: role and content only; refuse what would be lost
            dropped = sorted(k for k, v in message.items() if k not in ("role", "content") and v not in EMPTY)
            if dropped:
                raise BadRecordError(
                    f"messages[{i}] has {dropped}, which chat template {type(self).__name__} does not render (only "
                    "'role' and 'content'; tool calls, reasoning, per-turn loss flags would be lost): remove them, or "
                    "use chat_template='tokenizer' with a template that renders them"
                )
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in self.segments(messages):
            ids = self._ids(text)
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


class ChatmlTemplate(SegmentTemplate):
    """ChatML, as Qwen uses it (without Qwen's default system prompt)."""

    special_tokens = ("<|im_start|>", "<|im_end|>")

    def segments(self, messages):
        out = []
        for m in messages:
            if m["role"] == "assistant":
                out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            else:
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        return out

    def get_jinja_template(self) -> str:
        return (
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )


class Llama3Template(SegmentTemplate):
    """The Llama 3 instruct format (content used as given, not stripped)."""

    special_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def segments(self, messages):
        out = [("<|begin_of_text|>", False)]
        for m in messages:
            header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            if m["role"] == "assistant":
                out += [(header, False), (m["content"] + "<|eot_id|>", True)]
            else:
                out.append((header + m["content"] + "<|eot_id|>", False))
        return out

    def get_jinja_template(self) -> str:
        return (
            "{{ '<|begin_of_text|>' }}"
            "{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
            "{{ message['content'] + '<|eot_id|>' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        )


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template (``tokenizer.chat_template``), rendered by transformers.

    The assistant mask comes from rendering prefixes of the conversation: assistant turn ``i`` spans the text
    between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])`` (without
    trailing whitespace). The full text is tokenized once and a token is trained when its first character lies
    in such a span. A template whose render of a prefix is not a prefix of the full render (e.g. one that
    rewrites earlier turns) is refused with ``ValueError``. Needs a fast tokenizer (character offsets).
    """

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template='tokenizer': the tokenizer has no chat_template; use 'chatml' or 'llama3'")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("chat_template='tokenizer' needs a fast tokenizer (PreTrainedTokenizerFast) for offsets")

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        """The template's text for ``messages``; ``BadRecordError`` when the template refuses them (e.g. its
        ``raise_exception`` for roles that do not alternate): that depends on the record, so ``on_bad_record``
        applies."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt
            )
        except (TemplateError, ValueError) as exc:
            raise BadRecordError(f"the tokenizer's chat_template cannot render this conversation ({exc})") from exc

    def encode_messages(self, messages: Sequence[dict[str, str]], max_seq_len: int = 8192) -> dict[str, list[int]]:
        check_messages(messages)
        full = self._render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True) if i else self._generation_prompt_only()
            through = self._render(messages[: i + 1], False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ValueError(
                    "chat_template='tokenizer': the tokenizer's template renders a prefix of the conversation "
                    f"differently from the whole (at message {i}), so the assistant tokens cannot be located; "
                    "use 'chatml' or 'llama3', or a ChatTemplate subclass"
                )
            spans.append((len(before), len(through.rstrip())))
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        labels = [IGNORE_INDEX] * len(input_ids)
        span = 0
        for t, (start, end) in enumerate(encoding["offset_mapping"]):
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            if span < len(spans) and spans[span][0] <= start < spans[span][1] and end > start:
                labels[t] = input_ids[t]
        return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}

    def _generation_prompt_only(self) -> str:
        try:
            return self._render([], True)
        except BadRecordError as exc:  # templates may index messages[0]
            raise BadRecordError(
                "chat_template='tokenizer': a conversation that starts with the assistant cannot be masked with "
                f"this tokenizer's template ({exc})"
            ) from exc

    def get_jinja_template(self) -> str:
        return self.tokenizer.chat_template


TEMPLATES: dict[str, type[ChatTemplate]] = {
    "chatml": ChatmlTemplate,
    "qwen": ChatmlTemplate,
    "llama3": Llama3Template,
    "tokenizer": TokenizerTemplate,
}


def build_chat_template(name: str, tokenizer) -> ChatTemplate:
    """The chat template called ``name`` (``"chatml"``/``"qwen"``, ``"llama3"``, ``"tokenizer"``) for ``tokenizer``."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat_template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)
