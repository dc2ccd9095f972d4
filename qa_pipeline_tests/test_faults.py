"""Every fault the simulator can inject ends with the right record and reason, and the run goes on."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from aiohttp import web

from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.generation import ChunkTask, GenerationReport, GenerationSettings, Generator, StalledError
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.storage import Journal
from qa_pipeline_tests.conftest import cli_env, run_cli, sql
from qa_pipeline_tests.loopback import serve_app

FAST = {"step_base_ms": 1, "step_per_seq_ms": 0.05, "output_tokens_mean": 30, "output_tokens_max": 200}
SETTINGS = GenerationSettings(max_tokens=512)


def passages(count: int) -> list[ChunkTask]:
    return [
        ChunkTask(
            "manual.md",
            f"c{i:04d}",
            f"Paragraph {i}: the upload worker retries {i % 5 + 1} times and then writes the file to bucket {i}.",
        )
        for i in range(count)
    ]


def generate(base_url: str, tmp_path, tasks: list[ChunkTask], *, concurrency: int = 8, stop_after_s=None, **client):
    """Runs the real Generator against `base_url` and returns its report (journal under tmp_path)."""
    options = {"request_timeout_s": 5.0, "max_retries": 4, "backoff_base_s": 0.05, "endpoint_cooldown_s": 0.2}
    generator_options = {k: client.pop(k) for k in ("parse_retries", "stall_timeout_s") if k in client}
    options.update(client)

    async def main() -> GenerationReport:
        async with LLMClient(ClientConfig(base_urls=[f"{base_url}/v1"], **options)) as llm:
            generator = Generator(
                llm,
                DataLayout(tmp_path / "data"),
                SETTINGS,
                FixedLimit(concurrency),
                log=lambda line: None,
                **generator_options,
            )
            return await generator.run(tasks)

    return asyncio.run(main())


def by_reason(report: GenerationReport) -> Counter:
    return Counter("ok" if r.ok else r.reason for r in report.results["manual.md"])


def test_500_502_503_answers_are_retried_until_every_chunk_succeeds(simulator, tmp_path):
    sim = simulator(**FAST, fault_rate=0.2, fault_kinds=["500", "502", "503"], fault_seed=3)
    report = generate(sim.base_url, tmp_path, passages(60), max_retries=6)

    assert by_reason(report) == {"ok": 60}
    stats = sim.stats()
    assert {"500", "502", "503"} <= set(stats["by_status"])
    retried = [r for r in report.results["manual.md"] if r.attempts > 1]
    assert retried and stats["requests_total"] == sum(r.attempts for r in report.results["manual.md"])


def test_a_burst_of_503_while_the_server_restarts_is_ridden_out_with_the_default_settings(simulator, tmp_path):
    sim = simulator(**FAST, fault_rate=1.0, fault_kinds=["503"])

    async def main() -> GenerationReport:
        async with LLMClient(ClientConfig(base_urls=[f"{sim.base_url}/v1"])) as llm:
            generator = Generator(llm, DataLayout(tmp_path / "data"), SETTINGS, FixedLimit(8), log=lambda _: None)
            run = asyncio.create_task(generator.run(passages(20)))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(sim.set_faults)  # the server is ready again
            return await run

    report = asyncio.run(main())
    assert by_reason(report) == {"ok": 20}
    assert sim.stats()["by_status"]["503"] >= 8


def test_429_is_retried_no_sooner_than_the_servers_retry_after(simulator, tmp_path):
    sim = simulator(**FAST, fault_rate=0.3, fault_kinds=["429"], retry_after_s=1, fault_seed=1)
    report = generate(sim.base_url, tmp_path, passages(20), max_retries=6)

    assert by_reason(report) == {"ok": 20}
    retried = [r for r in report.results["manual.md"] if r.attempts > 1]
    assert retried and sim.stats()["by_status"]["429"] == sum(r.attempts - 1 for r in retried)
    for result in retried:
        assert result.latency_s >= 1.0 * (result.attempts - 1), "each retry waited for Retry-After (1 s)"


def test_a_request_hanging_past_the_timeout_is_recorded_as_timeout_after_bounded_retries(simulator, tmp_path):
    sim = simulator(**FAST, fault_rate=1.0, fault_kinds=["hang"], hang_s=30)
    started = time.monotonic()
    report = generate(sim.base_url, tmp_path, passages(4), request_timeout_s=1.0, max_retries=2)

    assert by_reason(report) == {"timeout": 4}
    assert all(r.attempts == 3 and "within 1 s" in r.detail for r in report.results["manual.md"])
    assert sim.stats()["requests_total"] == 12, "three attempts per chunk, no more"
    assert time.monotonic() - started < 15


def test_hangs_and_connection_resets_are_retried_and_the_run_completes(simulator, tmp_path):
    sim = simulator(**FAST, fault_rate=0.3, fault_kinds=["hang", "reset"], hang_s=30, fault_seed=5)
    report = generate(sim.base_url, tmp_path, passages(40), request_timeout_s=1.0, max_retries=8)

    assert by_reason(report) == {"ok": 40}
    faults = sim.stats()["faults"]
    assert faults.get("hang") and faults.get("reset")


def test_a_connection_reset_every_time_is_recorded_as_connection_error(simulator, tmp_path):
    sim = simulator(**FAST, fault_rate=1.0, fault_kinds=["reset"])
    report = generate(sim.base_url, tmp_path, passages(3), max_retries=2)

    assert by_reason(report) == {"connection_error": 3}
    assert sim.stats()["requests_total"] == 9


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("malformed", "invalid_json"), ("missing_field", "missing_field"), ("truncate", "truncated")],
)
def test_an_unusable_answer_is_asked_once_more_then_recorded_with_its_reason(simulator, tmp_path, kind, reason):
    sim = simulator(**FAST, fault_rate=1.0, fault_kinds=[kind])
    report = generate(sim.base_url, tmp_path, passages(5))

    assert by_reason(report) == {reason: 5}
    assert all("(asked 2 times)" in r.detail for r in report.results["manual.md"])
    assert sim.stats()["requests_total"] == 10, "one re-ask per chunk, no more"


def test_occasional_unusable_answers_are_repaired_by_the_re_ask(simulator, tmp_path):
    sim = simulator(**FAST, fault_rate=0.1, fault_kinds=["malformed", "missing_field", "truncate"], fault_seed=2)
    report = generate(sim.base_url, tmp_path, passages(100))

    faults = sum(sim.stats()["faults"].values())
    failed = [r for r in report.results["manual.md"] if not r.ok]
    # About 10 answers are unusable; a chunk fails only if its re-ask is unusable too (1 % of chunks).
    assert faults >= 3 and len(failed) <= 4
    assert sim.stats()["requests_total"] == 100 + faults - len(failed)
    assert all("(asked 2 times)" in r.detail for r in failed)


def test_a_server_killed_mid_run_and_restarted_on_its_port_lets_the_run_complete(simulator, tmp_path):
    sim = simulator(**FAST, max_num_seqs=4)
    tasks = passages(150)
    journal = DataLayout(tmp_path / "data").journal_file("manual.md")

    async def kill_and_restart() -> None:
        deadline = time.monotonic() + 30
        while not (journal.exists() and len(Journal(journal).load()) >= 30) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(sim.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(sim.restart)

    async def main() -> GenerationReport:
        async with LLMClient(ClientConfig(base_urls=[f"{sim.base_url}/v1"])) as llm:
            generator = Generator(llm, DataLayout(tmp_path / "data"), SETTINGS, FixedLimit(8), log=lambda _: None)
            restarted = asyncio.create_task(kill_and_restart())
            report = await generator.run(tasks)
            await restarted
            return report

    report = asyncio.run(main())
    assert by_reason(report) == {"ok": 150}
    assert 0 < sim.stats()["requests_total"] < 150, "the restarted server took the rest of the run"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_never_retried(tmp_path, status):
    """A server that answers every chat request with `status` gets exactly one request per chunk."""
    chat_requests = Counter()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def chat(request: web.Request) -> web.Response:
        chat_requests[status] += 1
        return web.json_response({"error": {"message": f"rejected with {status}", "code": status}}, status=status)

    async def main() -> GenerationReport:
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        async with serve_app(app) as root:
            config = ClientConfig(base_urls=[f"{root}/v1"], backoff_base_s=0.01)
            async with LLMClient(config) as llm:
                generator = Generator(llm, DataLayout(tmp_path / "data"), SETTINGS, FixedLimit(2), log=lambda _: None)
                return await generator.run(passages(3))

    report = asyncio.run(main())
    assert chat_requests[status] == 3
    results = report.results["manual.md"]
    assert all(not r.ok and r.http_status == status and r.attempts == 1 for r in results)
    assert all(f"rejected with {status}" in r.detail for r in results)


def test_a_server_rejecting_response_format_gets_the_same_request_without_it_and_the_run_completes(tmp_path):
    """Servers without structured output answer 400 naming response_format; the client asks again without it."""
    with_format: dict[str, dict] = {}
    without_format: dict[str, dict] = {}
    pair = {"question": "How often does it retry?", "answer": "A few times.", "type": "factual"}
    fenced = f"```json\n{json.dumps({'pairs': [pair]})}\n```"

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        passage = body["messages"][-1]["content"]
        if "response_format" in body:
            with_format[passage] = body
            refusal = {"error": {"message": "response_format is not supported", "code": 400}}
            return web.json_response(refusal, status=400)
        without_format[passage] = body
        return web.json_response({"choices": [{"message": {"content": fenced}, "finish_reason": "stop"}]})

    async def main() -> GenerationReport:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        async with serve_app(app) as root:
            config = ClientConfig(base_urls=[f"{root}/v1"], model="m", backoff_base_s=0.01)
            async with LLMClient(config) as llm:
                generator = Generator(llm, DataLayout(tmp_path / "data"), SETTINGS, FixedLimit(2), log=lambda _: None)
                return await generator.run(passages(3))

    report = asyncio.run(main())
    assert all(result.ok for result in report.results["manual.md"])
    assert len(without_format) == 3 and 1 <= len(with_format) <= 2  # two were in flight when the first was refused
    for passage, refused in with_format.items():
        assert without_format[passage] == {key: value for key, value in refused.items() if key != "response_format"}


def test_no_progress_for_the_stall_timeout_fails_loudly_and_keeps_finished_chunks(simulator, tmp_path):
    sim = simulator(**FAST)
    tasks = passages(30)
    generate(sim.base_url, tmp_path, tasks[:10])  # ten chunks are done before the server gets stuck
    sim.set_faults(fault_rate=1.0, fault_kinds=["hang"], hang_s=60)

    started = time.monotonic()
    with pytest.raises(StalledError, match=r"STALLED: no chunk finished in 2 s \(10/30 done"):
        generate(sim.base_url, tmp_path, tasks, request_timeout_s=60, stall_timeout_s=2)
    assert time.monotonic() - started < 10
    journal = Journal(DataLayout(tmp_path / "data").journal_file("manual.md"))
    assert len(journal.load()) == 10
    assert all(json.loads(line) for line in journal.path.read_text().splitlines())


def test_a_stalled_command_line_run_says_so_and_fails(simulator, data_dir):
    sim = simulator(**FAST, fault_rate=1.0, fault_kinds=["hang"], hang_s=60)
    (data_dir / "sources" / "notes.md").write_text("# Notes\n\nThe upload worker retries three times.\n")
    env = cli_env(data_dir, sim.base_url, QA_PIPELINE_STALL_TIMEOUT_S="3")

    run = run_cli("run", "--skip-benchmark", "--concurrency", "2", "--request-timeout", "60", env=env, check=False)
    assert run.returncode == 1
    assert "STALLED" in run.stderr and "no progress for 3 s" in run.stderr


def test_in_dagster_the_stall_and_request_timeouts_come_from_the_environment(simulator, data_dir, monkeypatch):
    """Runs launched from the UI have no command line: the same variables set the same limits, read
    when the code location loads its definitions."""
    import dagster as dg

    from qa_pipeline.definitions import defs

    sim = simulator(**FAST, fault_rate=1.0, fault_kinds=["hang"], hang_s=60)
    (data_dir / "sources" / "notes.md").write_text("# Notes\n\nThe upload worker retries three times.\n")
    monkeypatch.setenv("QA_PIPELINE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QA_PIPELINE_LLM_BASE_URL", sim.base_url)
    monkeypatch.setenv("QA_PIPELINE_STALL_TIMEOUT_S", "3")
    monkeypatch.setenv("QA_PIPELINE_REQUEST_TIMEOUT_S", "60")
    job = defs().resolve_implicit_global_asset_job_def()
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("documents", ["notes.md"])
    chunked = job.execute_in_process(asset_selection=[dg.AssetKey("chunks")], partition_key="notes.md", instance=instance)
    assert chunked.success

    started = time.monotonic()
    result = job.execute_in_process(
        asset_selection=[dg.AssetKey("qa_pairs")], partition_key="notes.md", instance=instance, raise_on_error=False,
        run_config={"ops": {"qa_pairs": {"config": {"concurrency": 2}}}},
    )
    assert not result.success
    failure = next(event for event in result.all_events if event.is_step_failure)
    assert "STALLED: no chunk finished in 3 s" in str(failure.step_failure_data.error)
    assert time.monotonic() - started < 30, "the 3 s stall timeout ended the run, not the 60 s request timeout"


def test_a_ten_percent_fault_mix_over_a_thousand_chunks_ends_with_at_least_99_percent_done(simulator, data_dir):
    sim = simulator(**FAST, max_num_seqs=64, fault_rate=0.1, hang_s=30, retry_after_s=1, fault_seed=7)
    with (data_dir / "sources" / "records.jsonl").open("w") as handle:
        for task in passages(1000):
            handle.write(json.dumps({"content": task.content}) + "\n")
    env = cli_env(data_dir, sim.base_url)

    run = run_cli(
        "run", "--skip-benchmark", "--concurrency", "32", "--max-tokens", "512", "--request-timeout", "2", env=env
    )
    assert "1 documents done, 0 failed" in run.stdout

    counts = sql(
        "SELECT (SELECT count(DISTINCT chunk_id) FROM qa_pairs) AS ok, (SELECT count(*) FROM failures) AS failed",
        env,
    )[0]
    assert counts["ok"] + counts["failed"] == 1000
    assert counts["ok"] >= 990
    reasons = {row["reason"] for row in sql("SELECT DISTINCT reason FROM failures", env)}
    assert reasons <= {"invalid_json", "missing_field", "truncated", "timeout", "connection_error", "http_error",
                       "rate_limited"}
    assert len(sim.stats()["faults"]) == 9, "every fault kind occurred"


def test_a_refused_api_key_fails_the_run_at_once_and_the_key_never_shows(simulator, data_dir):
    sim = simulator(**FAST, api_key="the-server-key")
    (data_dir / "sources" / "notes.md").write_text("# Notes\n\nThe upload worker retries three times.\n")
    env = cli_env(data_dir, sim.base_url, QA_PIPELINE_LLM_API_KEY="a-wrong-secret-key")

    run = run_cli("run", "--skip-benchmark", "--concurrency", "2", env=env, check=False)
    assert run.returncode == 1
    assert "refused the API key (HTTP 401); set QA_PIPELINE_LLM_API_KEY" in run.stderr
    assert "a-wrong-secret-key" not in run.stdout + run.stderr
    assert sim.stats()["requests_total"] == 0, "no chat request is sent, let alone retried"
