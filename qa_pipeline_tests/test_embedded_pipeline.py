"""`qa-pipeline run` with no endpoint configured: the project starts real vLLM on a CPU and uses it."""

import pytest

from qa_pipeline_tests.conftest import cli_env, copy_sample, run_cli, sql
from qa_pipeline_tests.test_embedded import data_dir_with_model, embedded_installed, model_dir  # noqa: F401

pytestmark = pytest.mark.embedded


def test_run_without_endpoint_generates_valid_pairs_and_reads_real_vllm_metrics(model_dir, tmp_path):  # noqa: F811
    layout = data_dir_with_model(tmp_path / "data", model_dir)
    (layout.root / "sources").mkdir()
    copy_sample(layout.root, "pep-0020.rst", "pep-3132.rst")
    env = cli_env(layout.root)
    assert "QA_PIPELINE_LLM_BASE_URL" not in env

    run = run_cli("run", "--levels", "1,4", "--sample-size", "4", env=env, timeout=1500, check=False)
    output = run.stdout + run.stderr
    assert "embedded vLLM server" in output, output[-3000:]
    assert "# Quality report" in run.stdout, output[-3000:]

    counts = sql(
        """SELECT (SELECT count(*) FROM chunks) AS chunks,
                  (SELECT count(DISTINCT chunk_id) FROM qa_pairs) AS with_pairs,
                  (SELECT count(*) FROM failures) AS failed,
                  (SELECT any_value(model) FROM qa_pairs) AS model""",
        env,
    )[0]
    assert counts["model"] == "smollm2"
    assert counts["with_pairs"] + counts["failed"] == counts["chunks"] > 0
    assert counts["with_pairs"] / counts["chunks"] >= 0.9, counts

    benchmark = sql(
        "SELECT concurrency, metric_samples, server_running_max, kv_cache_usage_max FROM benchmark_runs ORDER BY 1",
        env,
    )
    assert [row["concurrency"] for row in benchmark] == [1, 4]
    assert all(row["metric_samples"] > 0 for row in benchmark)
    # vllm:num_requests_running and vllm:kv_cache_usage_perc, read while the level ran.
    assert max(row["server_running_max"] for row in benchmark) >= 2
    assert max(row["kv_cache_usage_max"] for row in benchmark) > 0

    # README command 1 shows every check's verdict per document, failing ones included.
    assert "Checks (one verdict per document):" in run.stdout, output[-3000:]
    for check in ("success_rate", "groundedness", "duplicates"):
        assert f"  {check}: " in run.stdout and "/2 documents passed" in run.stdout

    # The server the run started is stopped at the end, as the command says.
    assert "Stopped the embedded vLLM server" in output
    assert not (layout.root / "embedded-server.json").exists()
    status = run_cli("embedded", "status", env=env, check=False)
    assert status.returncode == 1 and "no embedded server running" in status.stdout + status.stderr
