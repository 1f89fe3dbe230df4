"""One live tiny-model server (compaction on, API key set) for every live test module of the session: starting
vLLM costs far more than all the requests together, so the modules share it instead of starting their own."""

from __future__ import annotations

import openai
import pytest

from tests.serving.live_server import KEY, SERVER_ARGS, live_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from vllm_compact.models.registry import ensure_model

    with live_server(str(ensure_model("tiny")), SERVER_ARGS, tmp_path_factory.mktemp("live")) as live:
        yield live


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=300)
