"""Tokenizers: byte-level by default, or a Hugging Face `tokenizer.json` beside the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

N_BYTES = 256


class Tokenizer(Protocol):
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; 256 is BOS, 257 EOS, 258 PAD. Ids past the bytes decode to
    nothing, so a model with a larger (padded) vocabulary still decodes."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < N_BYTES).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from `tokenizer.json`."""

    def __init__(self, path: Path, eos_token_id: int) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(directory: Path | None, eos_token_id: int) -> Tokenizer:
    """The checkpoint's `tokenizer.json` when there is one, else the byte-level tokenizer."""
    if directory is not None and (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory / "tokenizer.json", eos_token_id)
    return ByteTokenizer()


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding the whole output.

    Decodes a short window of recent ids; a delta is released only once it no longer ends in a
    partial UTF-8 character (U+FFFD), so multi-byte characters split across tokens come out whole.
    At most MAX_PENDING ids are held back: a character is at most 4 bytes, so a longer run that
    still decodes to nothing or to U+FFFD (ids without text, invalid bytes) is released as it
    decodes, and the window - and each step's work - stays bounded however long the output.
    """

    MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-4:])
        self._prefix = 0  # start of the window decoded for context
        self._read = len(self._ids)  # ids before this are already in the text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        held = len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd")
        if held and len(self._ids) - self._read < self.MAX_PENDING:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back (a trailing partial character decodes as U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]
