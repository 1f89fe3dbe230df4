"""`make serve`'s server: the default model by name, compaction on with default settings, official openai client."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.serving.live_server import live_server


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # The model is given by our registry name, as `make serve` does; it resolves to the converted folder.
    with live_server("smollm2-135m", ["--kv-compaction"], tmp_path_factory.mktemp("smollm2")) as server:
        yield OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


def test_completions_answer(client):
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].text


def test_chat_completions_answer(client):
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=16, temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content
