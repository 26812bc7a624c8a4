"""Tokenizers: the byte-level one of the built-in presets, Hugging Face ``tokenizer.json`` through
the ``tokenizers`` library, and a sentencepiece ``tokenizer.model`` through the ``sentencepiece``
library. ``load_tokenizer`` picks one for a model directory; ``tokenizer.json`` wins when both are
there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


# tokenizer_config.json keys that each name one special token, in the order transformers numbers
# those the vocabulary lacks
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' tokenizer classes whose add_bos_token defaults to true; ERNIE 4.5's, like most, adds nothing
ADDS_BOS_BY_DEFAULT = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}


class SentencePieceTokenizer:
    """A sentencepiece ``tokenizer.model`` as transformers' slow sentencepiece tokenizers read it:
    ERNIE 4.5's own class (``Ernie4_5_Tokenizer``, which its PaddlePaddle release names), and
    Llama's with ``legacy=True``.

    Encoding splits out the literal text of added and special tokens (``added_tokens_decoder``, the
    special tokens ``tokenizer_config.json`` names, with their ``lstrip``/``rstrip``), maps each to
    its id, and has sentencepiece encode each stretch of text between them on its own (with the
    model's own normalizer and dummy prefix); then ``add_bos_token``/``add_eos_token``. Decoding
    drops special tokens and ids outside the vocabulary, keeps an added token's text as it is, and
    has sentencepiece decode each run of its ids between them (byte pieces of an unfinished
    character come out as U+FFFD, which the detokenizer waits on).

    Without ``added_tokens_decoder`` in the config, ``special_tokens_map.json`` and
    ``added_tokens.json`` are read as transformers reads that older layout. ``legacy: false`` (no
    dummy prefix after a special token) is not implemented and is refused.
    """

    def __init__(self, model_dir: Path):
        try:
            import sentencepiece
        except ImportError as exc:  # pragma: no cover - a dependency of the real engine
            raise ModelLoadError("the 'sentencepiece' package is needed to read tokenizer.model") from exc
        path = model_dir / "tokenizer.model"
        self._sp: Any = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            message = " ".join(str(exc).split())
            raise ModelLoadError(f"{path}: cannot be read as a sentencepiece model: {message}") from None
        config = _tokenizer_config(model_dir)
        if config.get("legacy") is False:
            raise ModelLoadError(f"{model_dir / 'tokenizer_config.json'}: legacy: false is not supported with a "
                                 f"sentencepiece tokenizer.model; provide tokenizer.json")
        self._num_pieces: int = self._sp.GetPieceSize()
        self._added: dict[str, int] = {}  # added and special tokens' text -> id
        self._special_ids: set[int] = set()
        strip: dict[str, tuple[bool, bool]] = {}  # text -> (lstrip, rstrip)
        try:
            for key, entry in config.get("added_tokens_decoder", {}).items():
                text = _token_text(entry)
                if not text:
                    continue  # as transformers: an empty token would match everywhere
                self._added[text] = int(key)
                strip[text] = (bool(entry.get("lstrip")), bool(entry.get("rstrip")))
                if entry.get("special"):
                    self._special_ids.add(int(key))
        except (AttributeError, TypeError, ValueError):
            raise ModelLoadError(f"{model_dir}: added_tokens_decoder is not {{id: {{content: ...}}}}") from None
        next_id = max([self._num_pieces - 1, *self._added.values()]) + 1
        for text in _special_tokens(config):
            if text not in self._added:
                piece_id = self._sp.PieceToId(text)  # the unknown piece's id when it has none
                if self._sp.IdToPiece(piece_id) != text:
                    piece_id, next_id = next_id, next_id + 1
                self._added[text] = piece_id
            self._special_ids.add(self._added[text])
        self._text_of = {i: text for text, i in self._added.items()}
        self.vocab_size = max(self._num_pieces, next_id)
        self._strip = {text: flags for text, flags in strip.items() if any(flags)}
        self._splitter: re.Pattern[str] | None = None
        if self._added and not config.get("split_special_tokens"):
            longest_first = sorted(self._added, key=len, reverse=True)
            self._splitter = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        adds_bos = config.get("add_bos_token", config.get("tokenizer_class") in ADDS_BOS_BY_DEFAULT)
        self._prefix = self._wrap(model_dir, config, "bos_token") if adds_bos else []
        self._suffix = self._wrap(model_dir, config, "eos_token") if config.get("add_eos_token") else []

    def _wrap(self, model_dir: Path, config: dict[str, Any], key: str) -> list[int]:
        """The id of the token that add_bos_token or add_eos_token adds."""
        text = _token_text(config.get(key))
        if text not in self._added:
            raise ModelLoadError(f"{model_dir}: tokenizer_config.json adds a {key} to each prompt but names none")
        return [self._added[text]]

    def encode(self, text: str) -> list[int]:
        parts = self._splitter.split(text) if self._splitter is not None else [text]
        for i in range(1, len(parts), 2):  # added tokens' text at odd indices, text between at even ones
            lstrip, rstrip = self._strip.get(parts[i], (False, False))
            if lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
            if rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
        ids = list(self._prefix)
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._added[part])
            elif part:
                ids += self._sp.Encode(part)
        return ids + self._suffix

    def decode(self, token_ids: list[int]) -> str:
        out: list[str] = []
        run: list[int] = []  # sentencepiece ids since the last added token
        for token_id in token_ids:
            if token_id in self._special_ids:
                continue
            text = self._text_of.get(token_id)
            if text is not None:
                out += [self._sp.Decode(run), text]
                run = []
            elif 0 <= token_id < self._num_pieces:
                run.append(token_id)
        return "".join(out) + str(self._sp.Decode(run))


def load_tokenizer(model_dir: Path) -> HFTokenizer | SentencePieceTokenizer:
    """The directory's ``tokenizer.json``, else its sentencepiece ``tokenizer.model``."""
    if (model_dir / "tokenizer.json").is_file():
        return HFTokenizer(model_dir / "tokenizer.json")
    if (model_dir / "tokenizer.model").is_file():
        return SentencePieceTokenizer(model_dir)
    raise ModelLoadError(f"{model_dir}: missing tokenizer.json (or a sentencepiece tokenizer.model)")


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """``tokenizer_config.json``; when it has no ``added_tokens_decoder``, with the keys of
    ``special_tokens_map.json`` over its own and ``added_tokens.json`` as that decoder."""
    config = read_json(model_dir / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        config.update(read_json(model_dir / "special_tokens_map.json"))
        specials = set(_special_tokens(config))
        config["added_tokens_decoder"] = {
            str(i): {"content": text, "special": text in specials}
            for text, i in read_json(model_dir / "added_tokens.json").items()}
    return config


def _special_tokens(config: dict[str, Any]) -> list[str]:
    """The special tokens' text in the order transformers numbers them: the named ones, other
    ``*_token`` keys (ERNIE's ``sys_start_token`` and the like), then the extra ones."""
    tokens = [config.get(key) for key in NAMED_SPECIAL_TOKENS]
    tokens += [value for key, value in config.items()
               if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and isinstance(value, str)]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    tokens += list(extra.values()) if isinstance(extra, dict) else extra if isinstance(extra, list) else []
    return list(dict.fromkeys(text for text in map(_token_text, tokens) if text))


def _token_text(value: Any) -> str:
    """A token as tokenizer_config.json writes it: its text, or an AddedToken's fields."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a model directory's config files); {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data
