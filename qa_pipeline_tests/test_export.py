"""Dataset exports split by document, filtered by scores, and batch files that round-trip to the same
rows as the online path."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from aiohttp import web

from qa_pipeline.core.batch import custom_id, export_batch_requests, import_batch_output
from qa_pipeline.core.client import ClientConfig, LLMClient
from qa_pipeline.core.concurrency import FixedLimit
from qa_pipeline.core.export import SPLITS, ExportOptions, assign_splits, export_dataset
from qa_pipeline.core.generation import ChunkTask, GenerationSettings, Generator
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.storage import Storage, results_to_frames
from qa_pipeline_tests.conftest import REPO, cli_env, run_cli
from qa_pipeline_tests.loopback import serve_app
from qa_pipeline_tests.written_outputs import write_document, write_sample_chunks

CHUNK = "Workers send their requests to the vLLM server, which batches them on the GPU since release 3.2."


def storage_at(path: Path) -> Storage:
    return Storage(DataLayout(root=path))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_export_splits_never_share_a_document_in_any_format(tmp_path):
    storage = storage_at(tmp_path / "data")
    for d in range(30):
        write_document(
            storage,
            f"guide-{d:02}.md",
            {f"c{d}": CHUNK},
            {f"c{d}": [(f"Which server batches requests for guide {d}?", "The vLLM server.", "factual"),
                       (f"What does the server use in guide {d}?", "The GPU.", "conceptual")]},
        )
    summary = export_dataset(storage, tmp_path / "out")

    documents = {}
    for split in SPLITS:
        rows = read_jsonl(tmp_path / "out" / f"{split}.jsonl")
        documents[split] = {row["document"] for row in rows}
        assert {row["split"] for row in rows} <= {split}
        assert pl.read_parquet(tmp_path / "out" / f"{split}.parquet").height == len(rows) == summary.rows[split]
        for example in read_jsonl(tmp_path / "out" / f"{split}.chat.jsonl"):
            assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    assert all(documents[a].isdisjoint(documents[b]) for a in SPLITS for b in SPLITS if a < b)
    assert set().union(*documents.values()) == {f"guide-{d:02}.md" for d in range(30)}
    assert all(documents[split] for split in SPLITS)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == summary.rows and sum(manifest["rows"].values()) == 60


def test_a_new_document_never_moves_the_others_to_another_split():
    fractions = {"train": 0.8, "validation": 0.1, "evaluation": 0.1}
    documents = [f"doc-{i}.md" for i in range(200)]
    before = assign_splits(documents, fractions, seed=3)
    after = assign_splits([*documents, "new.md"], fractions, seed=3)
    assert all(after[d] == before[d] for d in documents)
    shares = {s: sum(v == s for v in before.values()) / len(documents) for s in SPLITS}
    assert shares["train"] == pytest.approx(0.8, abs=0.08)


def test_a_small_corpus_still_gets_a_document_in_every_split():
    documents = [f"pep-{i}.rst" for i in range(6)]
    for seed in range(20):
        splits = assign_splits(documents, {"train": 0.8, "validation": 0.1, "evaluation": 0.1}, seed)
        assert set(splits.values()) == set(SPLITS), seed


def test_filters_leave_out_ungrounded_invented_refused_and_duplicate_pairs(tmp_path):
    storage = storage_at(tmp_path / "data")
    write_document(
        storage,
        "a.md",
        {"a1": CHUNK, "a2": CHUNK},
        {
            "a1": [
                ("Which server batches requests?", "The vLLM server batches them on the GPU.", "factual"),
                ("Who wrote the server?", "Engineers at Initech in Paris wrote it.", "factual"),
                ("Since when?", "Since release 4.7.", "factual"),
                ("Which GPU?", "The passage does not specify which GPU.", "factual"),
            ],
            "a2": [("Which server batches the requests?", "The vLLM server.", "factual")],
        },
    )
    options = ExportOptions(
        formats=("jsonl",), min_groundedness=0.5, drop_refusals=True, drop_invented_numbers=True, drop_duplicates=True
    )
    summary = export_dataset(storage, tmp_path / "out", options)
    exported = [row for split in SPLITS for row in read_jsonl(tmp_path / "out" / f"{split}.jsonl")]
    assert [row["answer"] for row in exported] == ["The vLLM server batches them on the GPU."]
    assert summary.dropped == {"refusal": 1, "low_groundedness": 1, "invented_numbers": 1, "duplicate": 1}


def test_documents_failing_their_checks_can_be_left_out(tmp_path):
    storage = storage_at(tmp_path / "data")
    write_document(storage, "good.md", {"g1": CHUNK}, {"g1": [("Which server?", "The vLLM server.", "factual")]})
    write_document(storage, "bad.md", {"b1": CHUNK, "b2": CHUNK}, {"b1": [("Which?", "The GPU.", "factual")]},
                   failures={"b2": "invalid_json"})
    options = ExportOptions(formats=("parquet",), exclude_failing_documents=True)
    summary = export_dataset(storage, tmp_path / "out", options)
    assert sum(summary.documents.values(), []) == ["good.md"]
    assert summary.dropped == {"failing_document": 1}


# --- batch files --------------------------------------------------------------------------------------


def sample_chunks(data_dir: Path) -> list[ChunkTask]:
    return write_sample_chunks(storage_at(data_dir), "pep-0020.rst")


async def generate_online(
    data_dir: Path, base_url: str, model: str, tasks: list[ChunkTask], settings: GenerationSettings | None = None
) -> pl.DataFrame:
    config = ClientConfig(base_urls=[ClientConfig.parse_base_urls(base_url)[0]], model=model, max_retries=0)
    async with LLMClient(config) as client:
        layout = DataLayout(root=data_dir)
        generator = Generator(client, layout, settings or GenerationSettings(), FixedLimit(4), log=lambda _: None)
        report = await generator.run(tasks)
    pairs, _ = results_to_frames(report.results[tasks[0].document])
    return pairs


@pytest.mark.parametrize(
    "settings",
    [GenerationSettings(), GenerationSettings(question_types=("factual",), max_tokens=300, temperature=0.3, seed=None)],
    ids=["defaults", "own-settings-without-seed"],
)
def test_a_batch_request_body_is_exactly_what_the_online_path_sends(tmp_path, settings):
    tasks = sample_chunks(tmp_path / "data")
    sent: dict[str, dict] = {}
    answer = json.dumps({"pairs": [{"question": "What is it?", "answer": "Beautiful.", "type": "factual"}]})

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        sent[body["messages"][-1]["content"]] = body
        return web.json_response(
            {"choices": [{"message": {"content": answer}, "finish_reason": "stop"}], "usage": {}}
        )

    async def scenario() -> pl.DataFrame:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        async with serve_app(app) as root:
            return await generate_online(tmp_path / "online", root, "capture-model", tasks, settings)

    pairs = asyncio.run(scenario())
    batch = tmp_path / "batch.jsonl"
    exported = export_batch_requests(storage_at(tmp_path / "data"), batch, "capture-model", settings)
    lines = read_jsonl(batch)
    assert exported.requests == len(lines) == len(tasks) == len(sent)
    for line in lines:
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        assert line["body"] == sent[line["body"]["messages"][-1]["content"]]
    hashes = dict(zip(pairs["chunk_id"].to_list(), pairs["request_hash"].to_list(), strict=True))
    assert {line["custom_id"] for line in lines} == {custom_id(c, h) for c, h in hashes.items()}


COMPARED = ["document", "chunk_id", "pair_index", "question", "answer", "type", "model", "request_hash",
            "prompt_version", "prompt_tokens", "completion_tokens"]


def test_a_batch_answered_by_the_simulator_imports_back_to_the_rows_of_the_online_path(simulator, tmp_path):
    options = {"zero_latency": True, "output_tokens_max": 800}
    sim = simulator(**options)
    tasks = sample_chunks(tmp_path / "online")
    online = asyncio.run(generate_online(tmp_path / "online", sim.base_url, "sim-model", tasks))

    sample_chunks(tmp_path / "batch")
    env = cli_env(tmp_path / "batch")
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    run_cli("export-batch", str(requests), "--model", "sim-model", env=env)
    subprocess.run(
        [sys.executable, "-m", "qa_pipeline.simulator", "batch", str(requests), str(results),
         "--zero-latency", "--output-tokens-max=800"],
        check=True, cwd=REPO, capture_output=True, timeout=300,
    )
    output_lines = read_jsonl(results)
    assert [line["custom_id"] for line in output_lines] == [line["custom_id"] for line in read_jsonl(requests)]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output_lines)

    imported = run_cli("import-batch", str(results), env=env)
    assert f"{len(tasks)} chunks with QA pairs and 0 failed chunks imported into 1 documents" in imported.stdout
    batch = storage_at(tmp_path / "batch").read_partition("qa_pairs", "pep-0020.rst")
    assert batch.select(COMPARED).equals(online.select(COMPARED))
    assert storage_at(tmp_path / "batch").read_partition("pair_scores", "pep-0020.rst").height == batch.height

    # The imported answers are the response cache: nothing is left to export for this model.
    again = run_cli("export-batch", str(requests), "--model", "sim-model", env=env)
    assert f"0 requests written to {requests} ({len(tasks)} chunks already have QA pairs" in again.stdout


def test_a_batch_of_custom_question_types_imports_pairs_of_those_types_and_says_when_the_types_differ(tmp_path):
    tasks = sample_chunks(tmp_path / "batch")
    env = cli_env(tmp_path / "batch")
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    run_cli("export-batch", str(requests), "--model", "sim-model", "--question-types", "definition,usage", env=env)
    subprocess.run(
        [sys.executable, "-m", "qa_pipeline.simulator", "batch", str(requests), str(results), "--zero-latency",
         "--output-tokens-max=800"],
        check=True, cwd=REPO, capture_output=True, timeout=300,
    )

    # Imported as if the default types had been asked: each answer is recorded as failed, saying why.
    wrong = run_cli("import-batch", str(results), env=env)
    assert f"0 chunks with QA pairs and {len(tasks)} failed chunks" in wrong.stdout
    failures = storage_at(tmp_path / "batch").read_partition("failures", "pep-0020.rst")
    assert set(failures["reason"]) == {"missing_field"}
    assert "fills the question types ['definition', 'usage']" in failures["detail"][0]

    # With the types of the export, every chunk gets one pair of each, in order, and no failure is left.
    imported = run_cli("import-batch", str(results), "--question-types", "definition,usage", env=env)
    assert f"{len(tasks)} chunks with QA pairs and 0 failed chunks" in imported.stdout
    pairs = storage_at(tmp_path / "batch").read_partition("qa_pairs", "pep-0020.rst")
    for _, chunk_pairs in pairs.group_by("chunk_id", maintain_order=True):
        assert chunk_pairs.sort("pair_index")["type"].to_list() == ["definition", "usage"]
    assert pairs["chunk_id"].n_unique() == len(tasks)
    assert storage_at(tmp_path / "batch").read_partition("failures", "pep-0020.rst").height == 0


def test_failed_and_invalid_batch_lines_become_failure_records(tmp_path):
    tasks = sample_chunks(tmp_path / "data")
    storage = storage_at(tmp_path / "data")
    requests = tmp_path / "requests.jsonl"
    export_batch_requests(storage, requests, "my-model")
    ids = [line["custom_id"] for line in read_jsonl(requests)]

    def completion(content: str, finish_reason: str = "stop") -> dict:
        return {"status_code": 200, "request_id": "r", "body": {
            "model": "my-model", "choices": [{"message": {"content": content}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}}

    lines = [
        {"id": "1", "custom_id": ids[0], "response": completion(
            json.dumps({"pairs": [{"question": "What is better?", "answer": "Beautiful.", "type": "factual"}]})),
         "error": None},
        {"id": "2", "custom_id": ids[1], "response": completion('{"pairs": [{"question": "Wh'), "error": None},
        {"id": "3", "custom_id": ids[2], "response": completion('{"pairs": [', "length"), "error": None},
        {"id": "4", "custom_id": ids[3], "response": {"status_code": 500, "request_id": "r", "body": None},
         "error": {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}},
        {"id": "5", "custom_id": ids[4], "response": None, "error": {"code": "rate_limit", "message": "slow down"}},
        {"id": "6", "custom_id": "0123456789abcdef-feedface", "response": completion("{}"), "error": None},
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")

    imported = import_batch_output(storage, results)
    assert (imported.imported, imported.failed) == (1, 4)
    assert imported.unknown_chunks == ["0123456789abcdef"] and imported.malformed_lines == [7]
    failures = storage.read_partition("failures", "pep-0020.rst")
    assert dict(zip(failures["chunk_id"].to_list(), failures["reason"].to_list(), strict=True)) == {
        tasks[1].chunk_id: "invalid_json",
        tasks[2].chunk_id: "truncated",
        tasks[3].chunk_id: "http_error",
        tasks[4].chunk_id: "http_error",
    }
    assert "engine died" in failures.filter(pl.col("chunk_id") == tasks[3].chunk_id)["detail"][0]
    assert storage.read_partition("qa_pairs", "pep-0020.rst")["answer"].to_list() == ["Beautiful."]
