"""Answer a batch input file as `vllm run-batch` does, through the simulator's own HTTP handlers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from qa_pipeline.simulator.config import HOST, SimulatorConfig
from qa_pipeline.simulator.server import Simulator


def run_batch(input_path: str | Path, output_path: str | Path, config: SimulatorConfig | None = None) -> int:
    """Answer an OpenAI/vLLM batch input file as `vllm run-batch` does; returns the number of requests.

    Every request goes through the same handlers as the HTTP API (served on a loopback port while the
    batch runs, capacity model and faults included); the output has one line per request, in input
    order: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
    """
    return asyncio.run(_run_batch(Path(input_path), Path(output_path), config or SimulatorConfig()))


async def _run_batch(input_path: Path, output_path: Path, config: SimulatorConfig) -> int:
    requests = []
    for number, text in enumerate(input_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            request = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{input_path}:{number}: not a JSON line: {error}") from None
        if not isinstance(request, dict) or not {"custom_id", "url", "body"} <= request.keys():
            raise ValueError(f"{input_path}:{number}: a batch request needs custom_id, method, url and body")
        requests.append(request)

    runner = web.AppRunner(Simulator(config).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    await web.SockSite(runner, sock).start()
    base_url = f"http://{HOST}:{sock.getsockname()[1]}"
    # As vllm run-batch: at most twice max_num_seqs requests in flight.
    gate = asyncio.Semaphore(2 * config.max_num_seqs)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    async def answer(session: aiohttp.ClientSession, request: dict) -> dict:
        async with gate:
            try:
                async with session.request(request.get("method", "POST"), base_url + request["url"],
                                           json=request["body"]) as response:
                    status, text = response.status, await response.text()
            except aiohttp.ClientError as error:
                return _batch_output(request, 400, None, f"{type(error).__name__}: {error}")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if status == 200:
            return _batch_output(request, status, body, None)
        return _batch_output(request, status, None, body if body is not None else text)

    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as session:
            lines = await asyncio.gather(*(answer(session, request) for request in requests))
    finally:
        await runner.cleanup()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(f".{output_path.name}.partial")
    partial.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(partial, output_path)
    return len(lines)


def _batch_output(request: dict, status: int, body: Any, error: Any) -> dict:
    return {
        "id": f"vllm-{uuid.uuid4().hex}",
        "custom_id": request["custom_id"],
        "response": {"status_code": status, "request_id": f"vllm-batch-{uuid.uuid4().hex}", "body": body},
        "error": error,
    }

