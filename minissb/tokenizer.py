"""Qwen2.5 tokenizer: the byte-level BPE from `tokenizer.json` plus the ChatML chat format.

The BPE itself is run by the `tokenizers` library (Rust). The chat template is written here
in plain Python instead of evaluating the Jinja template from tokenizer_config.json: for
system/user/assistant turns it renders the same string as the official Qwen2.5 template,
byte for byte (tests/test_tokenizer.py checks that against transformers):

    <|im_start|>system\n{system}<|im_end|>\n      (a default system message when none is given)
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n
    <|im_start|>assistant\n                       (the generation prompt)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import tokenizers


# What the official Qwen2.5 template inserts when a chat has no system message.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")

# The no-system branch of a Qwen2.5 template: {{- '<|im_start|>system\n...<|im_end|>\n' }}.
# Other Qwen2.5 releases (e.g. Qwen2.5-Math) only change the text between the markers.
_DEFAULT_SYSTEM_IN_TEMPLATE = re.compile(r"'<\|im_start\|>system\\n((?:[^'\\]|\\.)*)<\|im_end\|>\\n'")


def default_system_from_template(chat_template: str | None) -> str:
    """The default system message a Qwen-style Jinja chat template inserts (Qwen2.5's when unknown)."""
    if not chat_template:
        return QWEN_DEFAULT_SYSTEM
    m = _DEFAULT_SYSTEM_IN_TEMPLATE.search(chat_template)
    if m is None:
        return QWEN_DEFAULT_SYSTEM
    # Undo the escapes of a Jinja string literal: \n, \\, \' and \".
    escapes = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}
    return re.sub(r"\\(.)", lambda e: escapes.get(e.group(1), "\\" + e.group(1)), m.group(1))


def render_chatml(messages: list[dict], add_generation_prompt: bool = False, default_system: str = QWEN_DEFAULT_SYSTEM) -> str:
    """The Qwen2.5 ChatML string for a list of {"role", "content"} messages.

    A leading system message replaces the default one; a system message later in the chat is
    rendered as an ordinary turn, as the official template does.
    """
    if not messages:
        raise ValueError("cannot render an empty chat: give at least one message")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            what = f"role {role!r}" if isinstance(m, dict) else f"a {type(m).__name__}"
            raise ValueError(f"message {i} has {what}: only system/user/assistant dicts are supported (no tools)")
        if m.get("tool_calls"):
            raise ValueError(f"message {i} has tool_calls: tool use is not supported by minissb's chat template")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({role}) needs a string 'content', got {type(m.get('content')).__name__}")

    if messages[0]["role"] == "system":
        parts = [f"{IM_START}system\n{messages[0]['content']}{IM_END}\n"]
        turns = messages[1:]
    else:
        parts = [f"{IM_START}system\n{default_system}{IM_END}\n"]
        turns = messages
    parts += [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


class Tokenizer:
    """A Qwen2.5 tokenizer directory (tokenizer.json, optional tokenizer_config.json)."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None, source: str = "tokenizer"):
        self.backend = backend
        config = config or {}
        endoftext_id = self._special_id(ENDOFTEXT, source)
        self.im_end_id = self._special_id(IM_END, source)
        self._special_id(IM_START, source)  # the chat format needs it as one token
        # tokenizer_config.json names the pad token; Qwen2.5 pads with <|endoftext|>.
        self.pad_id = self._special_id(_token_name(config.get("pad_token")) or ENDOFTEXT, source)
        # Generation ends at the end of the assistant turn, or at end of text for base models.
        self.stop_ids = [self.im_end_id, endoftext_id]
        self.default_system = default_system_from_template(config.get("chat_template"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path).expanduser()
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{path} has no tokenizer.json (need a Hugging Face tokenizer directory)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust error can be long: keep its first line
            raise ValueError(f"{tok_file}: cannot be read by tokenizers: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        config = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        return cls(backend, config, source=str(tok_file))

    def _special_id(self, token: str, source: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise ValueError(f"{source} has no {token} token: is it a Qwen2.5 tokenizer?")
        return tid

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (BPE + added tokens).

        The model's embedding may have more rows than this (Qwen2.5: 151,665 vs 151,936).
        """
        return self.backend.get_vocab_size(with_added_tokens=True)

    # Special-token strings in the text (e.g. "<|im_end|>" inside a rendered chat) map to their
    # single ids; add_special_tokens=False because Qwen adds no BOS/EOS around a text.
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """The text of a list of ids, special tokens included."""
        return self.backend.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_chatml(messages, add_generation_prompt, self.default_system)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))


def _token_name(tok) -> str | None:
    # tokenizer_config.json writes special tokens either as "<|x|>" or as {"content": "<|x|>", ...}.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


__all__ = ["Tokenizer", "render_chatml", "default_system_from_template", "QWEN_DEFAULT_SYSTEM"]
