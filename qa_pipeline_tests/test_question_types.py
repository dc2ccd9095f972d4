"""With structured output on, the requested question types are slots of the schema: every chunk gets
exactly those types, in that order, each with a difficulty label and evidence quotes."""

from qa_pipeline_tests.conftest import cli_env, copy_sample, run_cli, sql


def test_every_chunk_has_exactly_the_requested_types_in_order_with_difficulty_and_evidence(simulator, data_dir):
    sim = simulator(zero_latency=True)
    copy_sample(data_dir, "pep-0020.rst", "pep-0604.rst")
    env = cli_env(data_dir, sim.base_url)

    run = run_cli(
        "run", "--levels", "2", "--sample-size", "4",
        "--question-types", "factual,howto,comparison",
        "--describe-type", "howto=asks how to do a task the passage describes",
        env=env,
    )

    chunks = sql(
        """SELECT c.chunk_id, list(q.type ORDER BY q.pair_index) AS types,
                  list(q.difficulty ORDER BY q.pair_index) AS difficulties,
                  bool_and(len(q.evidence) > 0) AS all_have_evidence
           FROM chunks c JOIN qa_pairs q USING (document, chunk_id) GROUP BY c.chunk_id""",
        env,
    )
    missing = sql("SELECT count(*) AS n FROM chunks c WHERE NOT EXISTS "
                  "(SELECT 1 FROM qa_pairs q WHERE q.chunk_id = c.chunk_id)", env)[0]["n"]
    assert chunks and missing == 0
    assert all(row["types"] == ["factual", "howto", "comparison"] for row in chunks)
    assert all(set(row["difficulties"]) <= {"easy", "medium", "hard"} for row in chunks)
    assert all(row["all_have_evidence"] for row in chunks)
    # The simulator quotes its passage verbatim: the report says every pair's evidence was found.
    pairs = sql("SELECT count(*) AS n FROM qa_pairs", env)[0]["n"]
    assert f"pairs whose evidence is not in their chunk: 0 of {pairs} (0.0 %)" in run.stdout
    assert "howto" in run.stdout and "difficulty labels: easy" in run.stdout
