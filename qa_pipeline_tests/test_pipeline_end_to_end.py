"""`qa-pipeline run` materializes the whole graph on a real Dagster instance against the simulator."""

from qa_pipeline_tests.conftest import cli_env, copy_sample, run_cli, sql

DOCUMENTS = ("pep-0020.rst", "pep-3132.rst", "pep-0604.rst")


def test_whole_graph_for_several_documents_is_queryable_and_consistent(simulator, data_dir):
    sim = simulator(max_num_seqs=32, step_base_ms=2, output_tokens_mean=150, output_tokens_max=800)
    copy_sample(data_dir, *DOCUMENTS)
    env = cli_env(data_dir, sim.base_url)

    run = run_cli("run", "--levels", "1,4,8", "--sample-size", "12", env=env)
    assert "3 documents done, 0 failed" in run.stdout
    assert "# Quality report" in run.stdout

    documents = sql("SELECT DISTINCT document FROM chunks ORDER BY 1", env)
    assert [row["document"] for row in documents] == sorted(DOCUMENTS)

    # Every chunk has QA pairs or a recorded failure.
    orphans = sql(
        """SELECT c.document, c.chunk_id FROM chunks c
           WHERE NOT EXISTS (SELECT 1 FROM qa_pairs q WHERE q.chunk_id = c.chunk_id)
             AND NOT EXISTS (SELECT 1 FROM failures f WHERE f.chunk_id = c.chunk_id)""",
        env,
    )
    assert orphans == []

    duplicates = sql("SELECT chunk_id, count(*) AS n FROM chunks GROUP BY 1 HAVING n > 1", env)
    assert duplicates == []

    pairs = sql("SELECT document, chunk_id, question, answer, type, model, latency_s FROM qa_pairs", env)
    assert pairs and {row["type"] for row in pairs} == {"factual", "conceptual", "comparison"}
    assert all(row["model"] == "sim-model" and row["latency_s"] > 0 for row in pairs)

    benchmark = sql("SELECT concurrency, recommended, server_running_max FROM benchmark_runs ORDER BY 1", env)
    assert [row["concurrency"] for row in benchmark] == [1, 4, 8]
    assert sum(row["recommended"] for row in benchmark) == 1
    assert max(row["server_running_max"] for row in benchmark) > 1

    # The report's counts match the tables.
    counts = sql(
        "SELECT (SELECT count(*) FROM chunks) AS chunks, (SELECT count(*) FROM qa_pairs) AS pairs", env
    )[0]
    report = run_cli("report", env=env).stdout
    assert f"chunks: {counts['chunks']}, QA pairs: {counts['pairs']}" in report


def test_a_second_run_reuses_the_recent_benchmark_of_the_same_server_and_sends_nothing(simulator, data_dir):
    sim = simulator(max_num_seqs=32, step_base_ms=2, output_tokens_mean=150, output_tokens_max=800)
    copy_sample(data_dir, "pep-0020.rst")
    env = cli_env(data_dir, sim.base_url)
    sweep = ("--levels", "1,4", "--sample-size", "6")
    run_cli("run", *sweep, env=env)
    sent = sim.stats()["requests_total"]

    again = run_cli("run", *sweep, env=env)

    assert "reusing the concurrency benchmark of" in again.stdout
    assert sim.stats()["requests_total"] == sent, "no sweep, and every chunk answered from the journal"
    assert len(sql("SELECT DISTINCT run_id FROM benchmark_runs", env)) == 1

    # Asked for, the sweep runs again; with a level given there is none to run.
    run_cli("run", *sweep, "--rebenchmark", env=env)
    assert sim.stats()["requests_total"] > sent
    assert len(sql("SELECT DISTINCT run_id FROM benchmark_runs", env)) == 2
    fixed = run_cli("run", "--concurrency", "4", env=env)
    assert "no benchmark" in fixed.stdout
    assert len(sql("SELECT DISTINCT run_id FROM benchmark_runs", env)) == 2
