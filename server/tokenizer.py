"""Tokenizers: the byte-level one of the built-in presets, and Hugging Face ``tokenizer.json``
through the ``tokenizers`` library."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

BOS, EOS = 256, 257


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; 256 is <bos>, 257 is <eos>."""

    vocab_size = 258
    bos_token_id = BOS
    eos_token_ids = (EOS,)

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode("utf-8")]

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a dependency of the real engine
            raise ModelLoadError("the 'tokenizers' package is needed to read tokenizer.json") from exc
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on a bad file
            raise ModelLoadError(f"{path}: cannot be read as a tokenizer: {exc}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))
