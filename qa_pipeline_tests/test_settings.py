"""Settings have one home: read once, each default stated once, a bad value named with what is expected."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from qa_pipeline_tests.conftest import REPO, cli_env, copy_sample, run_cli

PROBE = (
    "import warnings; warnings.simplefilter('ignore')\n"
    "from qa_pipeline.definitions import defs\n"
    "d = defs()\n"
    "for name in ('chunks', 'qa_pairs'): print(name, d.resolve_assets_def(name).backfill_policy)\n"
    "print('llm', d.resources['llm'].request_timeout_s, d.resources['llm'].stall_timeout_s)\n"
)


def load_definitions(**variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QA_PIPELINE_")}
    env.update(variables)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_loaded_definitions_show_the_settings_in_force_and_runs_span_many_documents_by_default():
    from qa_pipeline.core.settings import DEFAULT_DOCUMENTS_PER_RUN

    default = load_definitions().stdout.splitlines()
    assert f"qa_pairs BackfillPolicy.multi_run(max_partitions_per_run={DEFAULT_DOCUMENTS_PER_RUN})" in default
    assert f"chunks BackfillPolicy.multi_run(max_partitions_per_run={DEFAULT_DOCUMENTS_PER_RUN})" in default
    assert "llm 300.0 900.0" in default

    configured = load_definitions(
        QA_PIPELINE_DOCUMENTS_PER_RUN="all", QA_PIPELINE_REQUEST_TIMEOUT_S="42", QA_PIPELINE_STALL_TIMEOUT_S="120"
    ).stdout.splitlines()
    assert "qa_pairs BackfillPolicy.single_run()" in configured
    assert "llm 42.0 120.0" in configured


def test_a_bad_value_names_the_variable_and_what_is_expected():
    loaded = load_definitions(QA_PIPELINE_DOCUMENTS_PER_RUN="0")
    assert loaded.returncode != 0
    assert "QA_PIPELINE_DOCUMENTS_PER_RUN=0" in loaded.stderr and "a number >= 1 or 'all'" in loaded.stderr


def test_a_bad_timeout_breaks_the_run_with_its_name_but_not_the_commands_that_do_not_use_it(data_dir):
    copy_sample(data_dir, "pep-0020.rst")
    env = cli_env(data_dir, "http://127.0.0.1:9/v1", QA_PIPELINE_REQUEST_TIMEOUT_S="soon")
    chunked = run_cli("run", "--chunks-only", env=env)
    assert "1 documents done, 0 failed" in chunked.stdout
    assert run_cli("sql", "SELECT count(*) AS n FROM chunks", env=env).returncode == 0

    run = run_cli("run", "--skip-benchmark", env=env, check=False)
    assert run.returncode == 2
    assert "QA_PIPELINE_REQUEST_TIMEOUT_S='soon'" in run.stderr and "a number of seconds > 0" in run.stderr


@pytest.mark.parametrize("value", ["2", "-1"])
def test_a_failure_threshold_outside_0_to_1_is_refused_before_anything_runs(data_dir, value):
    copy_sample(data_dir, "pep-0020.rst")
    run = run_cli("run", "--failure-threshold", value, env=cli_env(data_dir), check=False)
    assert run.returncode == 2
    assert f"--failure-threshold: expected a fraction from 0 to 1, got '{value}'" in run.stderr


def test_the_environment_is_read_in_one_module_and_no_private_dagster_name_is_used():
    package = REPO / "qa_pipeline"
    readers, private = set(), set()
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"os\.environ\.get|os\.getenv|os\.environ\[", text):
            readers.add(path.relative_to(package).as_posix())
        if re.search(r"\bdagster\._", text):
            private.add(path.relative_to(package).as_posix())
    assert readers <= {"core/settings.py"}, readers
    assert private == set(), private


def test_readme_lists_every_variable_with_its_default():
    from qa_pipeline.core.settings import documented_variables

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for variable, default, _ in documented_variables():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{variable}`")), None)
        assert row is not None, f"README's settings table lacks {variable}"
        if default:
            assert f"`{default}`" in row, row
