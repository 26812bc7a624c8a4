"""Fuzzing the OpenAI surface of a live node (hypothesis): near-valid and arbitrary JSON bodies.

One sim-engine node serves the whole module (instant generation). Every body gets 200 or a 4xx
with OpenAI's error object: never a 5xx, never a dropped connection. Afterwards the node is
healthy, its counters add up to what the clients saw, and a normal request yields its exact
tokens.

Bodies are built from every field the request models declare (``openai_schema.py``), so a
field added there is fuzzed too (with generic junk until it gets its own strategy below).
"""

from __future__ import annotations

import functools
import http.client
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psched.cluster import Cluster, NodeProcess
from p2psched.openai_schema import ChatRequest, CompletionRequest

from .helpers import complete, expected_for

MAX_MODEL_LEN = 512  # short, so accepted fuzz requests generate few tokens
ENDPOINTS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- value strategies: boundary hunting ----

HUGE_INTS = [2**64, 2**64 - 1, 2**63, 2**63 - 1, 2**62, 2**40, 2**32, 2**31, 2**31 - 1, 2**20, 2**20 + 1,
             MAX_MODEL_LEN, MAX_MODEL_LEN + 1, 10**30, -1, -2, -(2**63), -(2**64), 0, 1]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]  # json.dumps writes NaN / Infinity literals
NUMBER_STRINGS = ["NaN", "nan", "Infinity", "-Infinity", "inf", "1e400", "-0", "0x10", "1_000", " 5", "", "null"]


@functools.cache
def unicode_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Any code point, lone surrogates included (sent as JSON \\ud800 escapes), and template syntax."""
    surrogate = st.characters(categories=["Cs"])
    char = st.one_of(st.characters(), surrogate, st.sampled_from(["\x00", "\u202e", "\ufeff", "\U0010ffff"]))
    chars = st.lists(char, max_size=max_size).map("".join)  # st.text() would drop the surrogates
    plain = st.text(max_size=max_size)
    with_surrogate = st.builds(lambda a, s, b: a + s + b, plain, surrogate, plain)
    return st.one_of(chars, with_surrogate, plain,
                     st.sampled_from(["<|eot|>", "{{ raise_exception('x') }}", "{% for %}", "%s%n"]))


@functools.cache
def json_junk() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(HUGE_INTS), st.integers(),
                        st.floats(), st.sampled_from(NON_FINITE), unicode_text(20), st.sampled_from(NUMBER_STRINGS))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(unicode_text(8), inner, max_size=5)), max_leaves=12)


def ints(valid: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, st.sampled_from(HUGE_INTS), st.integers(), st.floats(), st.sampled_from(NUMBER_STRINGS),
                     json_junk())


def floats(valid: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, st.sampled_from(NON_FINITE), st.sampled_from([0.0, -0.0, 1.0, 100.0, 100.0001, 1e308,
                                                                          5e-324, -1e-300]),
                     st.sampled_from(HUGE_INTS), st.floats(), st.sampled_from(NUMBER_STRINGS), json_junk())


@functools.cache
def flags() -> st.SearchStrategy[Any]:
    return st.one_of(st.booleans(), st.sampled_from([0, 1, "true", "false", None, [], {}]))


def token_ids(max_size: int) -> st.SearchStrategy[Any]:
    one = st.one_of(st.integers(0, 300), st.integers(0, 40_000), st.sampled_from(HUGE_INTS))
    return st.one_of(
        st.lists(one, max_size=max_size),
        st.builds(lambda x, n: [x] * n, one, st.sampled_from([0, 1, 255, 256, 257, 1000, 5000])),  # long lists
        st.lists(st.one_of(one, json_junk()), max_size=6),
        st.lists(st.lists(one, max_size=3), max_size=3),  # a batch of prompts, which we do not serve
    )


def stops() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), unicode_text(8), st.just(""), st.text(min_size=250, max_size=300),
                     st.lists(unicode_text(8), max_size=20), st.lists(st.just("x" * 257), max_size=2), json_junk())


def content_parts() -> st.SearchStrategy[Any]:
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": unicode_text(60)}),
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "", "TEXT"])},
                              optional={"text": json_junk(), "image_url": json_junk()}),
        json_junk())
    return st.lists(part, max_size=4)


def chat_messages() -> st.SearchStrategy[Any]:
    valid_role = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
    role = st.one_of(valid_role, st.sampled_from(["wizard", "", "USER", "function"]), json_junk())
    content = st.one_of(unicode_text(80), content_parts(), json_junk())
    message = st.one_of(
        st.fixed_dictionaries({"role": valid_role, "content": content}),  # content fuzzed
        st.fixed_dictionaries({"role": role, "content": st.text(max_size=20)}),  # role fuzzed
        st.fixed_dictionaries({}, optional={"role": role, "content": content, "name": unicode_text(8),
                                            "tool_calls": json_junk()}))
    return st.one_of(st.lists(message, min_size=1, max_size=4), st.lists(message, min_size=1, max_size=4),
                     st.just([]), json_junk(), st.lists(message, min_size=60, max_size=80))  # a long conversation


def prompts() -> st.SearchStrategy[Any]:
    return st.one_of(unicode_text(80), unicode_text(80), st.just(""),
                     st.text(min_size=MAX_MODEL_LEN - 8, max_size=MAX_MODEL_LEN + 8), token_ids(40), st.just([]),
                     json_junk())


VALID_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60)
VALID_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": VALID_TEXT}), min_size=1, max_size=3)

VALID: dict[str, st.SearchStrategy[Any]] = {  # values a well-behaved client sends
    "model": st.sampled_from(["sim", None]),
    "prompt": st.one_of(VALID_TEXT, st.lists(st.integers(0, 255), min_size=1, max_size=40)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": st.one_of(VALID_TEXT, VALID_PARTS)}),
                         min_size=1, max_size=3),
    "max_tokens": st.integers(1, 20),
    "max_completion_tokens": st.integers(1, 20),
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.0, 1.0, exclude_min=True),
    "top_k": st.integers(-1, 100),
    "seed": st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.none(),  # the sim engine refuses stop strings
    "stop_token_ids": st.lists(st.integers(0, 40_000), max_size=256),
    "ignore_eos": st.booleans(),
    "n": st.just(1),
    "user": VALID_TEXT,
    "return_token_ids": st.booleans(),
}

FUZZED: dict[str, st.SearchStrategy[Any]] = {  # boundaries, wrong types and junk (valid values too)
    "model": st.one_of(st.just("sim"), st.none(), unicode_text(12), json_junk()),
    "prompt": prompts(),
    "messages": chat_messages(),
    "max_tokens": ints(st.integers(1, 40)),
    "max_completion_tokens": ints(st.integers(1, 40)),
    "temperature": floats(st.floats(0.0, 2.0)),
    "top_p": floats(st.floats(0.0, 1.0)),
    "top_k": ints(st.integers(-2, 100)),
    "seed": ints(st.integers(0, 2**63 - 1)),
    "stream": flags(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"include_usage": flags()}),
                                json_junk()),
    "stop": stops(),
    "stop_token_ids": st.one_of(st.none(), token_ids(300), json_junk()),
    "ignore_eos": flags(),
    "n": ints(st.just(1)),
    "user": st.one_of(unicode_text(20), json_junk()),
    "return_token_ids": flags(),
}


def _fields(kind: str) -> tuple[str, list[str]]:
    """The main field of an endpoint and all others its request model declares."""
    model = ChatRequest if kind == "chat" else CompletionRequest
    main = "messages" if kind == "chat" else "prompt"
    return main, [name for name in model.model_fields if name != main]


def valid_bodies(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    main, others = _fields(kind)
    return st.fixed_dictionaries({main: VALID.get(main, json_junk())},
                                 optional={name: VALID.get(name, json_junk()) for name in others})


DROP = object()  # a field value meaning: leave the field out


def one_field_broken(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with one field (or an unknown one) set to a fuzzed value, or dropped."""
    main, others = _fields(kind)
    name = st.sampled_from([main, main, main, *others, "unknown_field", ""])  # the main field is the richest
    change = name.flatmap(lambda n: st.tuples(st.just(n), st.one_of(FUZZED.get(n, json_junk()), st.just(DROP))))
    return st.builds(lambda body, nv: {k: v for k, v in {**body, nv[0]: nv[1]}.items() if v is not DROP},
                     valid_bodies(kind), change)



def wild_bodies(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """Every declared field optional and fuzzed, plus unknown fields."""
    main, others = _fields(kind)
    fields = {name: FUZZED.get(name, json_junk()) for name in [main, *others]}
    extra = st.dictionaries(unicode_text(10), json_junk(), max_size=3)
    return st.builds(lambda b, e: {**e, **b}, st.fixed_dictionaries({}, optional=fields), extra)


def bodies(kind: str) -> st.SearchStrategy[bytes]:
    dicts = st.one_of(valid_bodies(kind), one_field_broken(kind), one_field_broken(kind), wild_bodies(kind),
                      json_junk())
    as_json = dicts.map(lambda v: json.dumps(v).encode())  # NaN, Infinity: literals Python's json reads back
    truncated = st.builds(lambda b, cut: b[:cut], as_json, st.integers(0, 200))
    return st.one_of(as_json, as_json, as_json, as_json, truncated, st.binary(max_size=64))


# ---- the node and the client ----

@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    cluster = Cluster(1, ["--engine", "sim", "--sim-decode-step-ms", "0", "--sim-decode-ms-per-seq", "0",
                          "--sim-max-model-len", str(MAX_MODEL_LEN)],
                      scheduler_name="local", log_dir=str(tmp_path_factory.mktemp("fuzz-http")))
    try:
        yield cluster.start().nodes[0]
    finally:
        cluster.stop()


def post(node: NodeProcess, path: str, body: bytes) -> tuple[int, str, bytes]:
    """(status, content type, body). A dropped connection raises, and so fails the test."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def check_error_object(status: int, raw: bytes) -> None:
    payload = json.loads(raw)
    assert isinstance(payload, dict) and set(payload) == {"error"}, (status, payload)
    error = payload["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, (status, payload)
    assert isinstance(error["message"], str) and error["message"], payload
    assert isinstance(error["type"], str) and error["type"], payload
    assert error["param"] is None or isinstance(error["param"], str), payload
    assert error["code"] is None or isinstance(error["code"], str), payload


def check_completion(kind: str, content_type: str, raw: bytes) -> None:
    if content_type.startswith("text/event-stream"):
        events = [line[len(b"data: "):] for line in raw.split(b"\n") if line.startswith(b"data: ")]
        assert events and events[-1] == b"[DONE]", raw[-500:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
        finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
        assert len(finishes) == 1 and finishes[0] in ("stop", "length"), chunks
        return
    payload = json.loads(raw)
    assert payload["object"] == ("chat.completion" if kind == "chat" else "text_completion"), payload
    [choice] = payload["choices"]
    assert choice["finish_reason"] in ("stop", "length"), payload
    usage = payload["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], payload


def check_serves_on(node: NodeProcess, i: int) -> None:
    assert node.proc is not None and node.proc.poll() is None, node.log_text()[-3000:]
    assert node.is_healthy(), node.log_text()[-3000:]
    body = complete(node.url, i, 9)
    assert body["choices"][0]["token_ids"] == expected_for(i, 9)


@pytest.mark.parametrize("kind", sorted(ENDPOINTS))
def test_fuzzed_bodies_get_200_or_an_openai_4xx(node: NodeProcess, kind: str) -> None:
    before = node.stats()["stats"]
    statuses: Counter[int] = Counter()

    @FUZZ
    @given(bodies(kind))
    def send(body: bytes) -> None:
        status, content_type, raw = post(node, ENDPOINTS[kind], body)
        assert status == 200 or 400 <= status < 500, (status, raw[:500])
        statuses[status] += 1
        if status == 200:
            check_completion(kind, content_type, raw)
        else:
            check_error_object(status, raw)

    send()
    # The fuzz must reach both sides of the validation boundary, or it tested little.
    num_ok = statuses[200]
    num_rejected = sum(n for s, n in statuses.items() if s != 200)
    assert num_ok >= 5 and num_rejected >= 50, statuses

    check_serves_on(node, 7)
    after = node.stats()["stats"]
    # Every 4xx went through the rejection path and every 200 completed: nothing failed or leaked.
    assert after["rejected"] - before["rejected"] == num_rejected, (statuses, after)
    assert after["completed"] - before["completed"] == num_ok + 1, (statuses, after)
    assert after["failed"] == before["failed"], after
    assert after.get("loop_errors", {}) == {}, after
    assert node.stats()["load"]["pending"] == 0


def test_the_node_serves_on_after_the_fuzz(node: NodeProcess) -> None:
    """Runs last, whatever the fuzz found: the process lives, is healthy and serves exactly."""
    check_serves_on(node, 11)
    stats = node.stats()
    assert stats["stats"].get("loop_errors", {}) == {}, stats["stats"]
    assert stats["load"]["pending"] == 0, stats["load"]
