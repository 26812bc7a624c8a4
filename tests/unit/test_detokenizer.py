import pytest

from server.detokenizer import TextStream
from server.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def bytes_of(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def stream_all(stream: TextStream, ids: list[int], step: int = 1) -> list[str]:
    pieces = [stream.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    return pieces + [stream.flush()]


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 end", "a€b", "🎉"])
def test_multibyte_characters_never_come_out_in_halves(text):
    pieces = stream_all(TextStream(TOK), bytes_of(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_spanning_tokens_cuts_the_text_before_it():
    stream = TextStream(TOK, ["STOP"])
    pieces = stream_all(stream, bytes_of("one two STOP three"))
    assert "".join(pieces) == "one two "
    assert stream.is_stopped and stream.text == "one two "


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    stream = TextStream(TOK, ["STOP"])
    pieces = stream_all(stream, bytes_of("a STO b ST"))
    assert "".join(pieces) == "a STO b ST"
    assert not stream.is_stopped
    assert pieces[-1] == "ST"  # held back until the end: it could still have become STOP


def test_earliest_of_several_stop_strings_wins_and_multibyte_stops_work():
    stream = TextStream(TOK, ["ö!", "xyz"])
    assert "".join(stream_all(stream, bytes_of("abc xyz ö! tail"), step=3)) == "abc "
    stream = TextStream(TOK, ["ö!"])
    assert "".join(stream_all(stream, bytes_of("abc ö! tail"))) == "abc "


def test_an_incomplete_character_at_the_end_is_flushed_as_replacement():
    stream = TextStream(TOK)
    ids = bytes_of("ok") + [0xE2, 0x82]  # the first two bytes of "€"
    assert "".join(stream_all(stream, ids)) == "ok\ufffd"
