"""A GGUF model's vocabulary and chat template: text to tokens and back (with each token's place in
the text, for chunking), and chat messages to the prompt text the model was trained on."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from wafer.domain import ChatMessage
from wafer.errors import FailedPreconditionError, InvalidArgumentError


class Vocab:
    """The model's tokenizer, through llama.cpp's vocabulary (valid while the model is loaded)."""

    def __init__(self, model: Any) -> None:
        self.ptr: Any = llama_cpp.llama_model_get_vocab(model)
        self.n_tokens = int(llama_cpp.llama_vocab_n_tokens(self.ptr))
        self._piece_buf = ctypes.create_string_buffer(64)

    def tokenize(self, text: str, *, special: bool, parse: bool) -> list[int]:
        """`special`: add the BOS/EOS the model's tokenizer adds; `parse`: read "<|...|>" as tokens."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = int(llama_cpp.llama_tokenize(self.ptr, data, len(data), buffer, capacity, special, parse))
        if n < 0:
            capacity = -n
            buffer = (llama_cpp.llama_token * capacity)()
            n = int(llama_cpp.llama_tokenize(self.ptr, data, len(data), buffer, capacity, special, parse))
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n})")
        return [int(t) for t in buffer[:n]]

    def piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = int(llama_cpp.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, False))
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = int(llama_cpp.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, False))
        return buf.raw[: max(n, 0)]

    def text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(llama_cpp.llama_vocab_get_text(self.ptr, token).decode("utf-8", errors="replace"))

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.ptr, token))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Token spans from the byte length of each token's piece.

        Tokenizers that add a leading space (SentencePiece's "add prefix space") make the pieces one
        byte longer than the text; that byte is taken off the first token. Tokens that split a
        character's UTF-8 bytes get the whole character.
        """
        data = text.encode("utf-8")
        ends: list[int] = []
        total = 0
        for token in self.tokenize(text, special=False, parse=False):
            total += len(self.piece(token))
            ends.append(total)
        shift = max(0, total - len(data))
        # char_of[b]: the character that byte b belongs to; char_of[len] = len(text).
        char_of = [0] * (len(data) + 1)
        position = 0
        for index, char in enumerate(text):
            width = len(char.encode("utf-8"))
            char_of[position : position + width] = [index] * width
            position += width
        char_of[len(data)] = len(text)
        spans: list[tuple[int, int]] = []
        begin = 0
        for end in ends:
            end_byte = min(len(data), max(0, end - shift))
            start_char = char_of[begin]
            # An end inside a character extends to that character's end.
            inside = end_byte < len(data) and not _starts_char(data, end_byte)
            end_char = char_of[end_byte] + 1 if inside else char_of[end_byte]
            spans.append((start_char, max(start_char, end_char)))
            begin = end_byte
        return spans


class ChatTemplate:
    """The chat template of the GGUF file's metadata (`tokenizer.chat_template`), if it has one."""

    def __init__(self, model_name: str, metadata: dict[str, str], vocab: Vocab) -> None:
        self._model_name = model_name
        self._formatter: Any = None
        template = metadata.get("tokenizer.chat_template")
        if template:
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=vocab.text(int(llama_cpp.llama_vocab_eos(vocab.ptr))),
                bos_token=vocab.text(int(llama_cpp.llama_vocab_bos(vocab.ptr))),
                add_generation_prompt=True,
            )

    @property
    def present(self) -> bool:
        return self._formatter is not None

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text of `messages`, ready for the assistant's turn."""
        name = self._model_name
        if self._formatter is None:
            raise InvalidArgumentError(f"model {name!r} has no chat template in its GGUF file; send a plain prompt")
        try:
            rendered = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        except Exception as exc:
            # The template's own raise_exception (a plain ValueError) refuses these messages; any
            # other error is a broken template: the model's fault, not the caller's.
            if type(exc) is ValueError:
                raise InvalidArgumentError(f"the chat template of model {name!r} refused: {exc}") from None
            raise FailedPreconditionError(f"the chat template of model {name!r} is broken: {exc}") from None
        return str(rendered.prompt)


def _starts_char(data: bytes, index: int) -> bool:
    """Whether byte `index` of UTF-8 `data` begins a character (is not a continuation byte)."""
    return (data[index] & 0xC0) != 0x80
