"""The sentencepiece tokenizer (``server.tokenizer.SentencePieceTokenizer``) against transformers
(a test-only dependency) on tiny BPE models with byte fallback trained here: the same ids and the
same text, special and added tokens included."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend  # noqa: E402

from server.chat_template import ChatTemplate  # noqa: E402
from server.detokenizer import TextStream  # noqa: E402
from server.errors import ModelLoadError  # noqa: E402
from server.loader import load  # noqa: E402
from server.tokenizer import HFTokenizer, SentencePieceTokenizer  # noqa: E402
from tests.unit.test_parity import checkpoint  # noqa: E402

IN_VOCAB = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>"]  # user-defined pieces, as in ERNIE's
WORDS = ("the quick brown fox jumps over a lazy dog while User Assistant says hello world again and "
         "café naïve Über straße 東京 中文 数据 модель 42 3.14 (x) [y] {z} <tag> #hash @at").split()
STRINGS = [
    "", " ", "   ", "\n", "Hello world", " leading space", "trailing space ", "many     spaces  inside",
    "tabs\tand\nnew\n\nlines\r\n", "café naïve Über straße", "東京の中文データ", "emoji 🤖🚀 and ✓", "ｆｕｌｌ ｗｉｄｔｈ ﬁ",
    "▁already▁marked", "<|begin_of_sentence|>User: hi\nAssistant: ", "a<|end_of_sentence|>b",
    "<s>bos in text</s>", "<unk> literal", "<mask:1><mask:4>", "<|IMAGE_PLACEHOLDER|> picture",
    "x <|LOC_0|> y", "x <|LOC_1|> y", "<|LOC_1|>", "  <|LOC_1|>  <|LOC_0|>  ", "<|begin_of_sentence|>",
    "half <|begin_of_sentence", "<|LOC_0|><|LOC_0|><|IMAGE_PLACEHOLDER|>",
]
ERNIE_TEMPLATE = ("{{- '<|begin_of_sentence|>' -}}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
                  "{{- 'User: ' + m['content'] + '\\n' -}}{%- endif -%}{%- endfor -%}{{- 'Assistant: ' -}}")


def train(tmp: Path, *, dummy_prefix: bool, normalization: str, squeeze_spaces: bool) -> Path:
    """A BPE tokenizer.model with byte fallback (as ERNIE 4.5's and Llama's) trained on generated text."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    (tmp / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "sp"), model_type="bpe", vocab_size=480,
        byte_fallback=True, character_coverage=0.99, user_defined_symbols=IN_VOCAB, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=dummy_prefix, normalization_rule_name=normalization,
        remove_extra_whitespaces=squeeze_spaces, num_threads=1, minloglevel=2)
    model_dir = tmp / "model"
    model_dir.mkdir()
    shutil.copy(tmp / "sp.model", model_dir / "tokenizer.model")
    return model_dir


def ernie_config(model_dir: Path, legacy_layout: bool, tokenizer_class: str = "Ernie4_5_Tokenizer") -> None:
    """ERNIE 4.5's tokenizer_config.json (its PaddlePaddle release's keys), with added tokens beyond the
    sentencepiece vocabulary: either as ``added_tokens_decoder`` or in the older layout, as
    ``special_tokens_map.json`` and ``added_tokens.json``."""
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    n = sp.GetPieceSize()
    named = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
             "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "mask_token": "<mask:1>"}
    config = {**named, "sys_start_token": "<mask:4>",  # in neither vocabulary: transformers numbers it next
              "additional_special_tokens": ["<|IMAGE_PLACEHOLDER|>"], "tokenizer_class": tokenizer_class,
              "chat_template": ERNIE_TEMPLATE}
    added = {"<|IMAGE_PLACEHOLDER|>": (n, True, False), "<|LOC_0|>": (n + 1, False, False),
             "<|LOC_1|>": (n + 2, False, True)}  # text: (id, special, lstrip and rstrip)
    if legacy_layout:
        (model_dir / "special_tokens_map.json").write_text(json.dumps(
            {**named, "additional_special_tokens": ["<|IMAGE_PLACEHOLDER|>"]}))
        (model_dir / "added_tokens.json").write_text(json.dumps({t: i for t, (i, _, _) in added.items()}))
    else:
        in_vocab = {t: (sp.PieceToId(t), True, False) for t in ["<unk>", "<s>", "</s>", *IN_VOCAB]}
        config["added_tokens_decoder"] = {
            str(i): {"content": t, "special": special, "lstrip": strip, "rstrip": strip, "normalized": False,
                     "single_word": False} for t, (i, special, strip) in {**in_vocab, **added}.items()}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))


class ErnieSlowTokenizer(SentencePieceBackend):
    """The oracle. ERNIE 4.5's tokenizer class (``Ernie4_5_Tokenizer``, remote code of its hub release,
    written against transformers 4) is transformers' slow tokenizer over sentencepiece, which this is
    with its one override: ``sp.encode`` on the text between added tokens, no BOS or EOS added, and
    ``sp.decode`` on the pieces between added tokens, whose text is kept (as transformers 4's slow
    decode keeps it)."""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, run = [], []
        for token in tokens:
            if token in self._added_tokens_encoder:
                out += [self.sp_model.decode(run), token]
                run = []
            else:
                run.append(token)
        return "".join(out) + self.sp_model.decode(run)


MODELS = {  # ERNIE's own normalizer is not known here: one without, one with sentencepiece's defaults
    "plain": {"dummy_prefix": False, "normalization": "identity", "squeeze_spaces": False},
    "nfkc, dummy prefix": {"dummy_prefix": True, "normalization": "nmt_nfkc", "squeeze_spaces": True},
    "llama": {"dummy_prefix": True, "normalization": "identity", "squeeze_spaces": False},  # Llama's class: BOS
}


@pytest.mark.parametrize("legacy_layout", [False, True], ids=["added_tokens_decoder", "added_tokens.json"])
@pytest.mark.parametrize("model", MODELS)
def test_encode_and_decode_match_transformers_slow_tokenizer(tmp_path, model, legacy_layout):
    """ERNIE's class; and Llama's, whose slow tokenizer (``legacy=True``) is the same with BOS first.
    (transformers 5's LlamaTokenizer converts tokenizer.model to a fast tokenizer, which needs protobuf.)"""
    model_dir = train(tmp_path, **MODELS[model])
    ernie_config(model_dir, legacy_layout, "LlamaTokenizer" if model == "llama" else "Ernie4_5_Tokenizer")
    ours = SentencePieceTokenizer(model_dir)
    theirs = ErnieSlowTokenizer.from_pretrained(str(model_dir),
                                                special_tokens_pattern="bos" if model == "llama" else "none")
    assert len(theirs) == ours.vocab_size
    for text in STRINGS:
        expected = theirs.encode(text)
        assert (text, ours.encode(text)) == (text, expected)
        assert (text, ours.decode(expected)) == (text, theirs.decode(expected, skip_special_tokens=True))
    rng = random.Random(1)  # any ids: byte pieces of half a character, special tokens, added ones
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        assert (ids, ours.decode(ids)) == (ids, theirs.decode(ids, skip_special_tokens=True))


def test_streamed_text_is_whole_characters(tmp_path):
    """Characters the vocabulary lacks come as several byte pieces: the detokenizer shows each once whole."""
    model_dir = train(tmp_path, **MODELS["plain"])
    ernie_config(model_dir, legacy_layout=False)
    tokenizer = SentencePieceTokenizer(model_dir)
    text = "emoji 🤖🚀 in 東京の中文データ, <|LOC_0|> café"
    stream = TextStream(tokenizer)
    shown = [stream.push([token_id]) for token_id in tokenizer.encode(text)] + [stream.flush()]
    assert "".join(shown) == tokenizer.decode(tokenizer.encode(text)) == text
    assert not any("\ufffd" in piece for piece in shown)


def test_bos_and_eos_follow_tokenizer_config(tmp_path):
    """ERNIE adds neither; Llama's class adds BOS unless add_bos_token says otherwise; add_eos_token adds EOS."""
    model_dir = train(tmp_path, **MODELS["plain"])
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    body = sp.Encode("hello world")
    for config, expected in [({}, body), ({"tokenizer_class": "Ernie4_5_Tokenizer"}, body),
                             ({"tokenizer_class": "LlamaTokenizer"}, [1, *body]),
                             ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}, body),
                             ({"add_bos_token": True, "add_eos_token": True}, [1, *body, 2])]:
        (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                     **config}))
        assert (config, SentencePieceTokenizer(model_dir).encode("hello world")) == (config, expected)


def test_config_refusals_are_one_clear_line(tmp_path):
    model_dir = train(tmp_path, **MODELS["plain"])
    for config, message in [({"legacy": False}, "legacy: false is not supported"),
                            ({"add_bos_token": True}, "adds a bos_token to each prompt but names none"),
                            ({"added_tokens_decoder": {"x": {"content": "a"}}}, "added_tokens_decoder is not"),
                            ({"added_tokens_decoder": {"7": "a"}}, "added_tokens_decoder is not")]:
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=message):
            SentencePieceTokenizer(model_dir)
    (model_dir / "tokenizer_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="cannot be read as JSON"):
        SentencePieceTokenizer(model_dir)


def test_an_ernie_directory_with_only_tokenizer_model_loads(tmp_path):
    """ERNIE 4.5's PaddlePaddle release ships tokenizer.model, no tokenizer.json: the loader reads it, and
    the chat template's special tokens come out as their ids. tokenizer.json wins when both are there."""
    model_dir = train(tmp_path, **MODELS["plain"])
    ernie_config(model_dir, legacy_layout=False)
    checkpoint(model_dir, "ernie", True)
    (model_dir / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    loaded = load(str(model_dir), "float32", "cpu")
    assert isinstance(loaded.tokenizer, SentencePieceTokenizer)
    prompt = ChatTemplate.from_model_dir(model_dir)([{"role": "user", "content": "hello"}])
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    ids = loaded.tokenizer.encode(prompt)
    assert ids[0] == sp.PieceToId("<|begin_of_sentence|>")
    assert loaded.tokenizer.decode(ids) == prompt.removeprefix("<|begin_of_sentence|>") == "User: hello\nAssistant: "
    (tmp_path / "tokenizer.json").rename(model_dir / "tokenizer.json")
    assert isinstance(load(str(model_dir), "float32", "cpu").tokenizer, HFTokenizer)
