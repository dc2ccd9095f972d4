"""The journal keeps every finished chunk durable and survives a crash in the middle of a line."""

from datetime import UTC, datetime

from qa_pipeline.core.prompts import QAPair
from qa_pipeline.core.storage import ChunkResult, Journal


def result(key: str, ok: bool = True) -> ChunkResult:
    pairs = [QAPair(question="What is it?", answer="A test.", type="factual")] if ok else []
    return ChunkResult(
        document="doc.md",
        chunk_id=f"chunk-{key}",
        request_hash=key,
        ok=ok,
        pairs=pairs,
        reason=None if ok else "timeout",
        finished_at=datetime.now(UTC),
    )


def test_results_appended_are_read_back_by_request_hash(tmp_path):
    journal = Journal(tmp_path / "doc.jsonl")
    with journal:
        journal.append(result("a"))
        journal.append(result("b", ok=False))
    loaded = journal.load()
    assert set(loaded) == {"a", "b"}
    assert loaded["a"].ok and not loaded["b"].ok


def test_a_line_cut_by_a_crash_is_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "doc.jsonl"
    with Journal(path) as journal:
        journal.append(result("a"))
    with path.open("a") as handle:
        handle.write(result("b").model_dump_json()[:40])  # the process died mid-write
    assert set(Journal(path).load()) == {"a"}


def test_a_later_failure_never_hides_an_earlier_success(tmp_path):
    journal = Journal(tmp_path / "doc.jsonl")
    with journal:
        journal.append(result("a"))
        journal.append(result("a", ok=False))
    assert journal.load()["a"].ok


def test_rewrite_keeps_only_current_chunks(tmp_path):
    journal = Journal(tmp_path / "doc.jsonl")
    with journal:
        for key in "abc":
            journal.append(result(key))
    journal.rewrite([result("b")])
    assert set(journal.load()) == {"b"}
