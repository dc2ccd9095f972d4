"""A wrong key, a model the server does not serve or a closed port: the cause is said once, first,
before any document is tried; a generated dataset is still reported while the server is down."""

from __future__ import annotations

import socket

import pytest

from qa_pipeline_tests.conftest import cli_env, copy_sample, run_cli, sql

DOCUMENTS = ("pep-0020.rst", "pep-3132.rst", "pep-0604.rst")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_said_once_before_any_request(run, cause: str) -> None:
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stderr.count(cause) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Stack Trace" not in run.stderr, run.stderr[-3000:]
    assert "No request was sent" in run.stderr
    assert "qa_pairs: starting a run" not in run.stdout, "no document was tried"


@pytest.mark.parametrize("problem", ["wrong key", "unknown model", "closed port"])
def test_a_server_that_cannot_serve_the_run_is_named_once_before_any_document_is_tried(simulator, data_dir, problem):
    sim = simulator(zero_latency=True, api_key="right-key")
    copy_sample(data_dir, *DOCUMENTS)
    settings = {
        "wrong key": dict(base_url=sim.base_url, QA_PIPELINE_LLM_API_KEY="wrong-key"),
        "unknown model": dict(base_url=sim.base_url, QA_PIPELINE_LLM_API_KEY="right-key", QA_PIPELINE_LLM_MODEL="llama-70b"),
        "closed port": dict(base_url=f"http://127.0.0.1:{closed_port()}/v1"),
    }[problem]
    env = cli_env(data_dir, **settings)
    run = run_cli("run", "--skip-benchmark", env=env, check=False)
    cause = {
        "wrong key": "refused the API key (HTTP 401)",
        "unknown model": "it serves: sim-model",
        "closed port": "cannot reach the LLM server",
    }[problem]
    assert_said_once_before_any_request(run, cause)
    assert "wrong-key" not in run.stdout + run.stderr and "right-key" not in run.stdout + run.stderr
    assert sim.stats()["requests_total"] == 0
    # The documents were chunked (no LLM needed) and a re-run resumes from there.
    assert sql("SELECT count(DISTINCT document) AS n FROM chunks", env) == [{"n": 3}]


def test_a_generated_dataset_is_reported_while_the_server_is_down(simulator, data_dir):
    sim = simulator(zero_latency=True, output_tokens_max=600)
    copy_sample(data_dir, "pep-0020.rst")
    env = cli_env(data_dir, sim.base_url)
    run_cli("run", "--skip-benchmark", "--concurrency", "4", env=env)
    sim.stop()

    report = run_cli("report", env=env)
    assert "# Quality report" in report.stdout
    assert sql("SELECT count(*) > 0 AS ok FROM qa_pairs", env) == [{"ok": True}]
