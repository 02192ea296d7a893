"""`/v1/embeddings` on a real pooling model (all-MiniLM-L6-v2, from PyPI), behind the gateway:
vectors equal to a plain transformers reference, usage counted as reserved and settled."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from tests.e2e import prestart
from tests.e2e.artifacts import embedding_model
from tests.e2e.server import SluiceProcess

MODEL = prestart.EMBEDDING_MODEL
SECRET = prestart.EMBEDDING_SECRET
ADMIN = prestart.EMBEDDING_ADMIN
SENTENCES = ["hello world", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def folder() -> Path:
    return embedding_model()


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceProcess]:
    process = prestart.take("embedding_server", tmp_path_factory)  # MODEL, keys SECRET
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def reference(folder: Path, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 by hand: mean pooling, then L2 norm."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_embeddings_match_the_reference_and_count_usage(
    embedding_server: SluiceProcess, folder: Path
) -> None:
    client = openai.OpenAI(base_url=embedding_server.api, api_key=SECRET, max_retries=0)
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=SENTENCES)
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    response = raw.parse()
    vectors = torch.tensor([item.embedding for item in response.data])
    assert vectors.shape == (2, 384)
    cosines = (vectors * reference(folder, SENTENCES)).sum(-1)
    assert bool((cosines > 0.9999).all()), cosines
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = sum(len(tokenizer.encode(s)) for s in SENTENCES)
    assert response.usage.prompt_tokens == tokens
    assert response.usage.total_tokens == tokens
    usage = openai.OpenAI(base_url=embedding_server.url, api_key=ADMIN).get(
        "/admin/keys/embedder/usage", cast_to=object
    )
    assert usage["windows"]["month"]["tokens"] == tokens  # type: ignore[index]
    assert usage["reserved"]["tokens"] == 0  # type: ignore[index]


def test_base64_embeddings(embedding_server: SluiceProcess) -> None:
    client = openai.OpenAI(base_url=embedding_server.api, api_key=SECRET, max_retries=0)
    plain = client.embeddings.create(model=MODEL, input="hello world")
    packed = client.embeddings.create(model=MODEL, input="hello world", encoding_format="base64")
    raw = packed.data[0].embedding
    if isinstance(raw, str):
        raw = list(struct.unpack("<384f", base64.b64decode(raw)))
    assert raw == pytest.approx(plain.data[0].embedding, abs=1e-6)


def test_embeddings_take_openais_input_lists(embedding_server: SluiceProcess) -> None:
    """40 inputs are embedded (the completions prompt cap of 16 refused 17); past OpenAI's
    2,048 a 400 naming `input`."""
    client = openai.OpenAI(base_url=embedding_server.api, api_key=SECRET, max_retries=0)
    many = client.embeddings.create(model=MODEL, input=[f"doc {i}" for i in range(40)])
    assert [item.index for item in many.data] == list(range(40))
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input=["x"] * 2049)
    assert refused.value.body["param"] == "input"  # type: ignore[index]


def test_the_gateway_applies_to_embeddings(embedding_server: SluiceProcess) -> None:
    refused = openai.OpenAI(base_url=embedding_server.api, api_key=SECRET + "x", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        refused.embeddings.create(model=MODEL, input="hi")
    client = openai.OpenAI(base_url=embedding_server.api, api_key=SECRET, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "not_supported"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(model=MODEL, input="word " * 400)
    assert "256" in too_long.value.message
