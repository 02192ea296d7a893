"""OpenTelemetry spans of the ASGI app: names, attributes, events, parent/child links."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from transformers import AutoTokenizer

from sluice.app import create_app
from sluice.config import Settings
from tests.api.conftest import (
    chat_body,
    completion_body,
    disconnect_during,
    make_settings,
    wait_ready,
)
from tests.fake_engine import MODEL_FOLDER, MODEL_ID, FakeEngine

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _chat_prompt_tokens() -> list[int]:
    """chat_body()'s user message under the default model's chat template, in tokens."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL_FOLDER)
    text = tokenizer.apply_chat_template(
        chat_body()["messages"], add_generation_prompt=True, tokenize=False
    )
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


PARENT_ID = "00f067aa0ba902b7"


def run(
    settings: Settings, engine: FakeEngine, *requests: tuple[str, dict[str, Any], dict[str, str]]
) -> list[ReadableSpan]:
    """Send `requests`, stop the app (which flushes spans) and return what was exported."""
    exporter = InMemorySpanExporter()
    app = create_app(settings, engine=engine, span_exporter=exporter)
    with TestClient(app) as client:
        wait_ready(client)
        for path, body, headers in requests:
            client.post(path, json=body, headers=headers)
    return list(exporter.get_finished_spans())


def by_name(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    matches = [s for s in spans if s.name == name]
    assert len(matches) == 1, [s.name for s in spans]
    return matches[0]


def events(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


def test_chat_generation_span_is_a_child_of_the_server_span() -> None:
    spans = run(make_settings(), FakeEngine(), ("/v1/chat/completions", chat_body(), {}))
    server = by_name(spans, "POST /v1/chat/completions")
    generation = by_name(spans, f"chat {MODEL_ID}")
    assert server.kind is SpanKind.SERVER
    assert generation.parent is not None
    assert generation.parent.span_id == server.context.span_id
    assert generation.context.trace_id == server.context.trace_id
    attributes = dict(generation.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == MODEL_ID
    assert attributes["gen_ai.request.max_tokens"] == 3
    assert attributes["gen_ai.request.temperature"] == 1.0
    assert attributes["gen_ai.request.top_p"] == 1.0
    assert attributes["gen_ai.usage.input_tokens"] == len(_chat_prompt_tokens())
    assert attributes["gen_ai.usage.output_tokens"] == 3
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert str(attributes["gen_ai.response.id"]).startswith("chatcmpl-")
    assert events(generation) == ["start_generate", "first_token", "end_generate"]
    assert generation.status.status_code is StatusCode.UNSET


def test_stream_span_and_model_loading_span() -> None:
    spans = run(
        make_settings(),
        FakeEngine(),
        ("/v1/completions", completion_body(max_tokens=2, stream=True, n=2), {}),
    )
    generation = by_name(spans, f"text_completion {MODEL_ID}")
    attributes = dict(generation.attributes or {})
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.usage.output_tokens"] == 4
    assert attributes["gen_ai.response.finish_reasons"] == ("length", "length")
    load = by_name(spans, "load_model")
    assert events(load) == ["start_load_model", "end_load_model"]
    assert dict(load.attributes or {})["gen_ai.request.model"] == MODEL_ID


def test_incoming_traceparent_joins_the_callers_trace() -> None:
    header = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    spans = run(make_settings(), FakeEngine(), ("/v1/chat/completions", chat_body(), header))
    server = by_name(spans, "POST /v1/chat/completions")
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert format(by_name(spans, f"chat {MODEL_ID}").context.trace_id, "032x") == TRACE_ID


def test_errors_are_recorded_on_the_generation_span() -> None:
    settings = make_settings(limits={"request_timeout_s": 0.1})
    spans = run(
        settings,
        FakeEngine(token_delay_s=0.05),
        ("/v1/completions", completion_body(max_tokens=50, stream=True), {}),
    )
    generation = by_name(spans, f"text_completion {MODEL_ID}")
    assert generation.status.status_code is StatusCode.ERROR
    assert "exception" in events(generation)
    assert events(generation)[-1] == "end_generate"


def test_disconnect_ends_the_generation_span_with_an_error() -> None:
    exporter = InMemorySpanExporter()
    engine = FakeEngine(token_delay_s=0.02)
    app = create_app(make_settings(), engine=engine, span_exporter=exporter)
    with TestClient(app) as client:
        wait_ready(client)
        client.portal.call(
            disconnect_during, client, "/v1/completions", completion_body(stream=True)
        )
    span = by_name(list(exporter.get_finished_spans()), f"text_completion {MODEL_ID}")
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["gen_ai.usage.output_tokens"] >= 1
    assert engine.aborted == [engine.requests[0].request_id]


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        _Receiver.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def otlp_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        f"http://127.0.0.1:{server.server_address[1]}/v1/traces",
    )
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sluice-test")
    try:
        yield _Receiver.bodies
    finally:
        server.shutdown()


def test_otlp_export_reaches_a_local_receiver(otlp_receiver: list[bytes]) -> None:
    app = create_app(make_settings(), engine=FakeEngine())
    with TestClient(app) as client:
        wait_ready(client)
        client.post("/v1/chat/completions", json=chat_body())
    assert otlp_receiver, "nothing was exported"
    names: set[str] = set()
    services: set[str] = set()
    for body in otlp_receiver:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                names.update(span.name for span in scope_spans.spans)
    assert services == {"sluice-test"}
    assert {"load_model", "POST /v1/chat/completions", f"chat {MODEL_ID}"} <= names


def test_a_streamed_chat_exports_the_server_span_and_the_genai_span_only(
    otlp_receiver: list[bytes],
) -> None:
    """No span per ASGI message (one per SSE chunk would be hundreds per answer): a stream of
    5 tokens exports its server span and its GenAI span (with the events), nothing else."""
    app = create_app(make_settings(), engine=FakeEngine())
    with TestClient(app) as client:
        wait_ready(client)
        response = client.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
        assert response.text.endswith("data: [DONE]\n\n") and response.text.count("data: ") >= 3
    names: list[str] = []
    for body in otlp_receiver:
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope_spans in resource_spans.scope_spans:
                names.extend(span.name for span in scope_spans.spans)
    assert sorted(n for n in names if n != "load_model") == sorted(
        ["POST /v1/chat/completions", f"chat {MODEL_ID}"]
    )
