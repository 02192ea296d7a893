"""Response shapes: completion and chat chunks, final bodies, echo, logprobs, usage chunks."""

from __future__ import annotations

from typing import Any

from sluice.api.formats import (
    SYSTEM_FINGERPRINT,
    ChatFormat,
    Choices,
    CompletionFormat,
    format_for,
)
from sluice.api.plan import GenerationJob
from sluice.engine.protocol import Delta, GenerationRequest, SamplingOptions, TokenLogprob


def make_job(
    kind: str = "text_completion",
    *,
    choices: int = 1,
    n: int = 1,
    include_usage: bool = False,
    echo: tuple[str, ...] | None = None,
    logprobs: bool = False,
    prompt_tokens: int = 3,
) -> GenerationJob:
    sampling = SamplingOptions(max_tokens=4, n=n)
    requests = tuple(
        GenerationRequest(f"req-{i}", (1, 2, 3), sampling) for i in range(choices // n)
    )
    return GenerationJob(
        kind=kind,  # type: ignore[arg-type]
        response_id="cmpl-abc" if kind == "text_completion" else "chatcmpl-abc",
        created=1700000000,
        model="fake-model",
        requests=requests,
        n=n,
        prompt_tokens=prompt_tokens,
        stream=True,
        include_usage=include_usage,
        echo_texts=echo,
        logprobs=logprobs,
    )


def lp(token: str, logprob: float = -0.5, top: tuple[tuple[str, float], ...] = ()) -> TokenLogprob:
    return TokenLogprob(token=token, logprob=logprob, top=top)


def feed(fmt: Any, choices: Choices, *deltas: Delta) -> list[dict[str, Any]]:
    return [fmt.chunk(delta, choices.add(delta)) for delta in deltas]


# --- completions ------------------------------------------------------------------------------


def test_completion_chunks() -> None:
    job = make_job()
    fmt, choices = CompletionFormat(job), Choices(job)
    chunks = feed(
        fmt,
        choices,
        Delta(index=0, text=" Hello", token_count=1),
        Delta(index=0, text=" world", token_count=1, finish_reason="length"),
    )
    assert chunks == [
        {
            "id": "cmpl-abc",
            "object": "text_completion",
            "created": 1700000000,
            "model": "fake-model",
            "choices": [{"index": 0, "text": " Hello", "logprobs": None, "finish_reason": None}],
        },
        {
            "id": "cmpl-abc",
            "object": "text_completion",
            "created": 1700000000,
            "model": "fake-model",
            "choices": [
                {"index": 0, "text": " world", "logprobs": None, "finish_reason": "length"}
            ],
        },
    ]


def test_completion_final() -> None:
    job = make_job(choices=2, n=2)
    fmt, choices = CompletionFormat(job), Choices(job)
    for delta in (
        Delta(index=1, text="B", token_count=2),
        Delta(index=0, text="A", token_count=1, finish_reason="stop"),
        Delta(index=1, text="b", token_count=1, finish_reason="length"),
    ):
        choices.add(delta)
    assert fmt.final(choices) == {
        "id": "cmpl-abc",
        "object": "text_completion",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {"index": 0, "text": "A", "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "text": "Bb", "logprobs": None, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def test_unfinished_choice_reports_stop() -> None:
    job = make_job()
    choices = Choices(job)
    choices.add(Delta(index=0, text="x", token_count=1))
    assert CompletionFormat(job).final(choices)["choices"][0]["finish_reason"] == "stop"
    assert choices.finish_reasons() == ["stop"]


def test_completion_echo_stream_prefixes_first_chunk_of_each_choice() -> None:
    job = make_job(choices=4, n=2, echo=("P0", "P1"))
    fmt, choices = CompletionFormat(job), Choices(job)
    chunks = feed(
        fmt,
        choices,
        Delta(index=0, text=" a", token_count=1),
        Delta(index=3, text=" d", token_count=1),
        Delta(index=0, text=" b", token_count=1),
    )
    assert [c["choices"][0]["text"] for c in chunks] == ["P0 a", "P1 d", " b"]


def test_completion_echo_final() -> None:
    job = make_job(choices=4, n=2, echo=("P0", "P1"))
    choices = Choices(job)
    for i in range(4):
        choices.add(Delta(index=i, text=f" c{i}", token_count=1, finish_reason="length"))
    texts = [c["text"] for c in CompletionFormat(job).final(choices)["choices"]]
    assert texts == ["P0 c0", "P0 c1", "P1 c2", "P1 c3"]


def test_completion_logprobs_stream_offsets_continue() -> None:
    job = make_job(logprobs=True)
    fmt, choices = CompletionFormat(job), Choices(job)
    chunks = feed(
        fmt,
        choices,
        Delta(index=0, text=" Hi", token_count=1, logprobs=(lp(" Hi", -0.1, (("x", -2.0),)),)),
        Delta(index=0, text=" you", token_count=1, logprobs=(lp(" you", -0.2),)),
    )
    assert chunks[0]["choices"][0]["logprobs"] == {
        "tokens": [" Hi"],
        "token_logprobs": [-0.1],
        "top_logprobs": [{"x": -2.0}],
        "text_offset": [0],
    }
    assert chunks[1]["choices"][0]["logprobs"] == {
        "tokens": [" you"],
        "token_logprobs": [-0.2],
        "top_logprobs": [{}],
        "text_offset": [3],
    }


def test_completion_logprobs_final_with_echo_offsets_after_prompt() -> None:
    job = make_job(logprobs=True, echo=("Say",))
    choices = Choices(job)
    choices.add(Delta(index=0, text=" Hi you", token_count=2, logprobs=(lp(" Hi"), lp(" you"))))
    logprobs = CompletionFormat(job).final(choices)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" Hi", " you"]
    assert logprobs["token_logprobs"] == [-0.5, -0.5]
    assert logprobs["text_offset"] == [3, 6]


def test_completion_echo_logprobs_offsets_agree_between_stream_and_final() -> None:
    job = make_job(logprobs=True, echo=("Say",))
    fmt, choices = CompletionFormat(job), Choices(job)
    (chunk,) = feed(fmt, choices, Delta(index=0, text=" Hi", token_count=1, logprobs=(lp(" Hi"),)))
    final = fmt.final(choices)
    assert chunk["choices"][0]["text"] == "Say Hi"
    assert (
        chunk["choices"][0]["logprobs"]["text_offset"]
        == final["choices"][0]["logprobs"]["text_offset"]
        == [3]
    )


def test_completion_usage_key_only_with_include_usage() -> None:
    delta = Delta(index=0, text="x", token_count=1)
    without = make_job()
    assert "usage" not in CompletionFormat(without).chunk(delta, Choices(without).add(delta))
    with_usage = make_job(include_usage=True)
    chunk = CompletionFormat(with_usage).chunk(delta, Choices(with_usage).add(delta))
    assert "usage" in chunk
    assert chunk["usage"] is None


def test_completion_usage_chunk() -> None:
    job = make_job(include_usage=True, choices=2, n=2, prompt_tokens=5)
    choices = Choices(job)
    choices.add(Delta(index=0, text="a", token_count=3))
    choices.add(Delta(index=1, text="b", token_count=4))
    assert CompletionFormat(job).usage_chunk(choices) == {
        "id": "cmpl-abc",
        "object": "text_completion",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


# --- chat ---------------------------------------------------------------------------------------


def test_chat_chunks_first_delta_carries_role() -> None:
    job = make_job("chat", choices=2, n=2, include_usage=True)
    fmt, choices = ChatFormat(job), Choices(job)
    chunks = feed(
        fmt,
        choices,
        Delta(index=0, text="He", token_count=1),
        Delta(index=1, text="Yo", token_count=1),
        Delta(index=0, text="llo", token_count=1, finish_reason="stop"),
    )
    assert chunks[0] == {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "He"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": None,
    }
    assert chunks[1]["choices"][0]["delta"] == {"role": "assistant", "content": "Yo"}
    assert chunks[2]["choices"][0] == {
        "index": 0,
        "delta": {"content": "llo"},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_chat_chunk_without_include_usage_has_no_usage_key() -> None:
    job = make_job("chat")
    delta = Delta(index=0, text="x", token_count=1)
    assert "usage" not in ChatFormat(job).chunk(delta, Choices(job).add(delta))


def test_chat_final() -> None:
    job = make_job("chat", prompt_tokens=4)
    choices = Choices(job)
    choices.add(Delta(index=0, text="Hello", token_count=1))
    choices.add(Delta(index=0, text=" there", token_count=1, finish_reason="length"))
    assert ChatFormat(job).final(choices) == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there", "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }


def test_chat_logprobs_carry_utf8_bytes() -> None:
    job = make_job("chat", logprobs=True)
    fmt, choices = ChatFormat(job), Choices(job)
    delta = Delta(
        index=0, text="é", token_count=1, logprobs=(lp("é", -0.25, (("e", -1.5), ("€", -3.0))),)
    )
    expected = {
        "content": [
            {
                "token": "é",
                "logprob": -0.25,
                "bytes": [0xC3, 0xA9],
                "top_logprobs": [
                    {"token": "e", "logprob": -1.5, "bytes": [0x65]},
                    {"token": "€", "logprob": -3.0, "bytes": [0xE2, 0x82, 0xAC]},
                ],
            }
        ],
        "refusal": None,
    }
    (chunk,) = feed(fmt, choices, delta)
    assert chunk["choices"][0]["logprobs"] == expected
    assert fmt.final(choices)["choices"][0]["logprobs"] == expected


def test_chat_logprobs_off_is_null() -> None:
    job = make_job("chat")
    choices = Choices(job)
    choices.add(Delta(index=0, text="a", token_count=1, logprobs=(lp("a"),)))
    assert ChatFormat(job).final(choices)["choices"][0]["logprobs"] is None


def test_chat_usage_chunk() -> None:
    job = make_job("chat", include_usage=True, prompt_tokens=2)
    choices = Choices(job)
    choices.add(Delta(index=0, text="a", token_count=1, finish_reason="stop"))
    assert ChatFormat(job).usage_chunk(choices) == {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [],
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }


def test_format_for_picks_by_kind() -> None:
    assert isinstance(format_for(make_job("chat")), ChatFormat)
    assert isinstance(format_for(make_job("text_completion")), CompletionFormat)
