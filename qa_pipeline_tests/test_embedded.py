"""The embedded default server: real vLLM (CPU build) serving SmolLM2 on loopback, started by the project.

Slow (a few minutes). QA_PIPELINE_MODEL_CACHE may name a models folder kept between runs so that
the model is converted only once.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from qa_pipeline.core.embedded import (
    INSTALL_HINT,
    MODEL_NAME,
    PREPARED_MARKER,
    EmbeddedServer,
    EmbeddedServerError,
    embedded_available,
    missing_embedded_packages,
    prepare_model,
    recorded_server,
    stop_embedded_server,
)
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.prompts import ParseError, build_messages, parse_pairs, response_format
from qa_pipeline.core.settings import DEFAULT_MAX_TOKENS

pytestmark = pytest.mark.embedded

PASSAGES = [
    "A virtual environment is a directory that contains its own Python interpreter and its own set "
    "of installed packages. Creating one per project keeps the dependencies of different projects "
    "apart, so upgrading a library for one project cannot break another.",
    "The cache stores every answer under a key made from the model name, the messages and the "
    "sampling parameters. A run that repeats unchanged work reads the stored answer instead of "
    "asking the server again, which makes re-running a finished pipeline almost free.",
    "Partitions split the work by source document. When one document changes, only its partition "
    "is generated again; when a partition fails, it can be re-run alone without touching the others.",
    "The server closes idle connections after five seconds. Clients should therefore keep idle "
    "connections for a shorter time, or they will send requests on sockets the server has closed.",
    "Continuous batching lets the server add a new request to the running batch as soon as another "
    "finishes, instead of waiting for the whole batch. This keeps the accelerator busy when requests "
    "have very different lengths.",
    "A journal records each finished chunk as soon as its answer arrives. If the process is killed, "
    "the next run reads the journal, skips the chunks already done and never writes a duplicate.",
]


@pytest.fixture(scope="session")
def embedded_installed() -> None:
    if embedded_available():
        return
    reason = f"the [embedded] extra is not installed (missing {', '.join(missing_embedded_packages())}). {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the embedded server tests, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def model_dir(embedded_installed, tmp_path_factory) -> Path:
    cache = os.environ.get("QA_PIPELINE_MODEL_CACHE")
    models_dir = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return prepare_model(models_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with EmbeddedServer(model_dir, data / "embedded-server.json", data / "logs") as running:
        yield running


def data_dir_with_model(root: Path, model_dir: Path) -> DataLayout:
    """A fresh data directory whose models folder is the already prepared one (no second conversion)."""
    layout = DataLayout(root=root)
    layout.root.mkdir()
    layout.models_dir.symlink_to(model_dir.parent)
    return layout


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel lists them) with a TCP socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def port_accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_model_is_prepared_once_as_a_marked_hugging_face_folder(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", PREPARED_MARKER):
        assert (model_dir / name).is_file(), name
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    messages: list[str] = []
    started = time.monotonic()
    assert prepare_model(model_dir.parent, progress=messages.append) == model_dir
    assert time.monotonic() - started < 2
    assert messages == []


def test_a_half_finished_conversion_is_redone(embedded_installed, model_dir, tmp_path):
    unfinished = tmp_path / model_dir.name
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{")

    messages: list[str] = []
    prepared = prepare_model(tmp_path, progress=messages.append)

    assert prepared == unfinished
    assert (prepared / PREPARED_MARKER).is_file()
    assert json.loads((prepared / "config.json").read_text())["model_type"] == "llama"
    assert any("unfinished" in message for message in messages)
    assert [path.name for path in tmp_path.iterdir() if not path.name.startswith(".")] == [model_dir.name]


def test_the_server_listens_on_loopback_only_and_lists_the_model(server):
    assert server.started_here
    assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
    port = int(server.base_url.removesuffix("/v1").rsplit(":", 1)[1])
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1

    async def listed_models() -> list[str]:
        async with aiohttp.ClientSession() as session, session.get(f"{server.base_url}/models") as response:
            return [entry["id"] for entry in (await response.json())["data"]]

    assert asyncio.run(listed_models()) == [MODEL_NAME]


def test_qa_requests_with_the_json_schema_mostly_give_valid_pairs(server):
    async def ask(session: aiohttp.ClientSession, passage: str, seed: int) -> str | None:
        body = {
            "model": server.model,
            "messages": build_messages(passage),
            "response_format": response_format(),
            # The project's default budget: three schema slots with evidence quotes take about 330 tokens
            # from this model, so 400 cut some answers short and made the test flaky.
            "max_tokens": DEFAULT_MAX_TOKENS,
            "temperature": 0.2,
            "seed": seed,
        }
        async with session.post(f"{server.base_url}/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            choice = (await response.json())["choices"][0]
        try:
            parse_pairs(choice["message"]["content"], choice["finish_reason"])
        except ParseError as error:
            return str(error)
        return None

    async def ask_all() -> list[str | None]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(ask(session, p, seed) for seed, p in enumerate(PASSAGES)))

    errors = asyncio.run(ask_all())

    failed = [error for error in errors if error is not None]
    assert len(failed) <= len(PASSAGES) // 3, failed


def test_metrics_report_running_requests_and_kv_cache_usage(server):
    async def metrics() -> str:
        async with aiohttp.ClientSession() as session, session.get(f"{server.root_url}/metrics") as response:
            assert response.status == 200
            return await response.text()

    names = {line.split("{")[0].split(" ")[0] for line in asyncio.run(metrics()).splitlines()}

    assert "vllm:num_requests_running" in names
    assert "vllm:kv_cache_usage_perc" in names


def test_a_server_that_cannot_start_raises_with_the_end_of_its_log(embedded_installed, tmp_path):
    bogus_model = tmp_path / "not-a-model"
    bogus_model.mkdir()
    (bogus_model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    server = EmbeddedServer(bogus_model, tmp_path / "embedded-server.json", tmp_path / "logs", progress=lambda _: None)

    with pytest.raises(EmbeddedServerError) as raised:
        server.start()

    message = str(raised.value)
    assert "exited with code" in message
    assert f"Last lines of {tmp_path / 'logs'}" in message
    log_lines = (tmp_path / "logs" / "embedded-vllm.log").read_text().splitlines()
    assert log_lines and log_lines[-1] in message
    assert "no-such-architecture" in message
    assert not (tmp_path / "embedded-server.json").exists()


def test_a_running_server_is_reused_and_only_its_starter_stops_it(model_dir, tmp_path):
    layout = data_dir_with_model(tmp_path / "data", model_dir)
    messages: list[str] = []

    with EmbeddedServer.for_data_dir(layout, progress=messages.append) as starter:
        port = int(starter.root_url.rsplit(":", 1)[1])
        assert starter.started_here and port_accepts_connections(port)
        assert any("elapsed" in message for message in messages), "start-up shows its progress"

        async def reuse_and_leave() -> tuple[str, bool]:
            async with EmbeddedServer.for_data_dir(layout, progress=messages.append) as second:
                return second.base_url, second.started_here

        assert asyncio.run(reuse_and_leave()) == (starter.base_url, False)
        assert port_accepts_connections(port), "the reusing process left the server running"
        assert recorded_server(layout).base_url == starter.base_url
        pid = starter.pid

    assert not port_accepts_connections(port)
    assert not Path(f"/proc/{pid}").exists()
    assert not (layout.root / "embedded-server.json").exists()


def test_a_server_left_running_is_stopped_by_stop_embedded_server(model_dir, tmp_path):
    layout = data_dir_with_model(tmp_path / "data", model_dir)
    left_running = EmbeddedServer.for_data_dir(layout, progress=lambda _: None).start()
    port = int(left_running.root_url.rsplit(":", 1)[1])

    assert stop_embedded_server(layout, progress=lambda _: None) is True

    assert not port_accepts_connections(port)
    assert recorded_server(layout) is None
    assert stop_embedded_server(layout, progress=lambda _: None) is False
