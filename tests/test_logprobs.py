"""Token logprobs: `stream` attaches them without changing the text, and `nomoat serve` returns them on chat
and text completions, streamed or not, as the OpenAI API defines them: the log-softmax of the model's own
logits before temperature, top-k / top-p and penalties, read through the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import make_tiny_lm
from test_serve import Live, start_server, stop_server

from nomoat.runtime.generate import GenerationConfig, GenerationStats, stream
from nomoat.runtime.loading import LoadedModel
from nomoat.runtime.logprobs import Piece, TokenLogprob, TokenText
from nomoat.runtime.prompts import prompt_ids
from nomoat.serve import ServerSettings

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CTX = 1024
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    srv = start_server(make_tiny_lm(seed=3, max_position_embeddings=CTX), "tiny", {}, ServerSettings())
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def ref() -> LoadedModel:
    """The same weights, never touched by the server's thread."""
    return make_tiny_lm(seed=3, max_position_embeddings=CTX)


def local(lm: LoadedModel, ids: list[int], cfg: GenerationConfig) -> tuple[str, list[TokenLogprob], GenerationStats]:
    st = GenerationStats()
    pieces = list(stream(lm.model, lm.tokenizer, ids, cfg, st))
    return "".join(pieces), [e for p in pieces for e in getattr(p, "logprobs", ())], st


@torch.no_grad()
def own_logprobs(lm: LoadedModel, ids: list[int], gen: list[int]) -> torch.Tensor:
    """log-softmax of one full forward pass over prompt + generated tokens, at each generated position."""
    logits = lm.model(torch.tensor([ids + gen]))[0].double()
    return torch.log_softmax(logits[len(ids) - 1:len(ids) - 1 + len(gen)], -1)


@pytest.mark.parametrize("cfg", [dict(temperature=0), dict(temperature=1.3, top_p=0.9, seed=5, repetition_penalty=1.3),
                                 dict(temperature=0, stop=("e",))])
def test_stream_logprobs_keep_the_text(ref: LoadedModel, cfg: dict) -> None:
    ids = prompt_ids(ref, PROMPT)
    plain = "".join(stream(ref.model, ref.tokenizer, ids, GenerationConfig(max_new_tokens=40, **cfg)))
    text, entries, st = local(ref, ids, GenerationConfig(max_new_tokens=40, logprobs=4, **cfg))
    assert text == plain
    # Every generated token but a final end-of-turn token has its entry.
    ended_by_eos = st.finish_reason == "stop" and not cfg.get("stop")
    assert st.generated_tokens - len(entries) in ((0, 1) if cfg.get("stop") else (int(ended_by_eos),))
    assert all(len(e.top) == 4 and e.top[0][1] >= e.top[-1][1] for e in entries)
    want = own_logprobs(ref, ids, [e.token for e in entries])
    got = torch.tensor([e.logprob for e in entries], dtype=torch.float64)
    torch.testing.assert_close(got, want[torch.arange(len(entries)), [e.token for e in entries]], atol=1e-4, rtol=0)
    # The pieces stay plain strings when no logprobs are asked for: the normal path is unchanged.
    pieces = stream(ref.model, ref.tokenizer, ids, GenerationConfig(max_new_tokens=40, **cfg))
    assert not any(isinstance(p, Piece) for p in pieces)


def _check_against_own_logits(ref: LoadedModel, ids: list[int], content, cfg: GenerationConfig) -> None:
    _, entries, _ = local(ref, ids, cfg)  # the same tokens the server decoded (greedy, or the same seed)
    assert len(content) == len(entries) > 0
    want = own_logprobs(ref, ids, [e.token for e in entries])
    tt = TokenText(ref.tokenizer)
    for i, (c, e) in enumerate(zip(content, entries)):
        assert c.token == tt.text(e.token) and bytes(c.bytes) == tt.bytes(e.token)
        assert c.logprob == pytest.approx(float(want[i, e.token]), abs=1e-4)
        top = want[i].topk(len(c.top_logprobs))
        assert [t.token for t in c.top_logprobs] == [tt.text(j) for j in top.indices.tolist()]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_chat_logprobs_equal_own_logits(live: Live, ref: LoadedModel) -> None:
    r = live.client().chat.completions.create(model="tiny", messages=PROMPT, max_tokens=16, temperature=0,
                                              logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    # The tokens' bytes spell the reply (the detokenizer drops a trailing incomplete character).
    spelled = b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace")
    assert spelled.rstrip("\ufffd") == r.choices[0].message.content.rstrip("\ufffd")
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy takes the top
    _check_against_own_logits(ref, prompt_ids(ref, PROMPT), content,
                              GenerationConfig(max_new_tokens=16, temperature=0, logprobs=5))


def test_sampled_logprobs_are_read_before_temperature(live: Live, ref: LoadedModel) -> None:
    kw = dict(temperature=1.7, top_p=0.8, seed=11)
    r = live.client().chat.completions.create(model="tiny", messages=PROMPT, max_tokens=12, logprobs=True,
                                              top_logprobs=3, extra_body={"repetition_penalty": 1.5}, **kw)
    cfg = GenerationConfig(max_new_tokens=12, top_k=40, repetition_penalty=1.5, logprobs=3, **kw)
    _check_against_own_logits(ref, prompt_ids(ref, PROMPT), r.choices[0].logprobs.content, cfg)


def test_streamed_chat_logprobs(live: Live) -> None:
    c = live.client()
    args = dict(model="tiny", messages=PROMPT, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
    whole = c.chat.completions.create(**args).choices[0].logprobs.content
    chunks = list(c.chat.completions.create(stream=True, **args))
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    parts = [ch.choices[0].logprobs.content for ch in chunks[1:] if ch.choices[0].logprobs]
    assert [(x.token, x.logprob) for p in parts for x in p] == [(x.token, x.logprob) for x in whole]
    for ch in chunks[1:]:
        if ch.choices[0].delta.content:  # every text delta carries the tokens it came from
            lp = ch.choices[0].logprobs.content
            assert b"".join(bytes(x.bytes) for x in lp).decode("utf-8", "replace") == ch.choices[0].delta.content


def test_completion_logprobs(live: Live, ref: LoadedModel) -> None:
    c = live.client()
    prompt = "The quick brown fox"
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert all(len(d) <= 3 and max(d.values()) == pytest.approx(v) for d, v in zip(lp.top_logprobs,
                                                                                  lp.token_logprobs))
    ids = ref.tokenizer.encode(prompt, add_special_tokens=True)
    _, entries, _ = local(ref, ids, GenerationConfig(max_new_tokens=12, temperature=0, logprobs=3))
    want = own_logprobs(ref, ids, [e.token for e in entries])
    assert lp.token_logprobs == pytest.approx([float(want[i, e.token]) for i, e in enumerate(entries)], abs=1e-4)
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                       stream=True))
    streamed = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset  # offsets run on across chunks
    assert [v for s in streamed for v in s.token_logprobs] == lp.token_logprobs


def test_no_logprobs_unless_asked(live: Live) -> None:
    c = live.client()
    assert c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=3).choices[0].logprobs is None
    assert c.completions.create(model="tiny", prompt="Hi", max_tokens=3).choices[0].logprobs is None
    r = c.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=3, logprobs=True)
    assert all(x.top_logprobs == [] for x in r.choices[0].logprobs.content)


@pytest.mark.parametrize("route,body,param", [
    ("chat/completions", {"messages": PROMPT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": PROMPT, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": PROMPT, "logprobs": "yes"}, "logprobs"),
    ("completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "Hi", "logprobs": True}, "logprobs"),
])
def test_bad_logprob_requests(live: Live, route: str, body: dict, param: str) -> None:
    r = httpx.post(f"{live.url}/v1/{route}", json={"model": "tiny", "max_tokens": 2, **body})
    assert r.status_code == 400 and param in (r.json()["error"]["param"] or ""), r.text
