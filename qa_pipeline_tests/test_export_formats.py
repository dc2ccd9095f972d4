"""Exports for retrieval evaluation and sharing, made by the real CLI from a run against the simulator:
a BEIR folder read back by a BEIR-style loader, a Hugging Face folder read by following the `datasets`
folder conventions, the user's own chunk ids on every row, and splits by a metadata field."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from qa_pipeline.core.export import ExportOptions, export_dataset
from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.storage import Storage
from qa_pipeline_tests.conftest import cli_env, copy_sample, run_cli, sql
from qa_pipeline_tests.written_outputs import write_document

SERVICES = ("billing", "auth", "search", "storage", "mail")
PEPS = ("pep-0020.rst", "pep-0604.rst", "pep-3132.rst")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_beir(folder: Path, split: str) -> tuple[dict, dict, dict]:
    """corpus, queries and qrels of one split, read as BEIR's GenericDataLoader reads them."""
    corpus = {row["_id"]: {"title": row.get("title", ""), "text": row["text"]} for row in read_jsonl(folder / "corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in read_jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qrels" / f"{split}.tsv").open(encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        assert next(reader) == ["query-id", "corpus-id", "score"]
        for query_id, corpus_id, score in reader:
            qrels.setdefault(query_id, {})[corpus_id] = int(score)
    return corpus, queries, qrels


_DTYPES = {"string": pl.String, "int32": pl.Int32, "int64": pl.Int64, "float64": pl.Float64, "bool": pl.Boolean}


def load_hf_folder(folder: Path) -> dict[str, pl.DataFrame]:
    """split → rows of a dataset folder, following what `datasets.load_dataset(folder)` follows: the
    README.md YAML header's `configs` (data files per split, globs relative to the folder), checked
    against its `dataset_info` (features and split sizes)."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n", 2)[1])
    (config,) = header["configs"]
    assert config["config_name"] == "default"
    info = header["dataset_info"]
    sizes = {split["name"]: split["num_examples"] for split in info["splits"]}
    splits = {}
    for entry in config["data_files"]:
        paths = sorted(glob.glob(str(folder / entry["path"])))
        assert paths, f"{entry['path']} matches no file"
        frame = pl.concat([pl.read_parquet(path) for path in paths])
        assert frame.height == sizes[entry["split"]]
        for feature in info["features"]:
            dtype = frame.schema[feature["name"]]
            if "sequence" in feature:
                assert isinstance(dtype, pl.List) and isinstance(dtype.inner, _DTYPES[feature["sequence"]])
            else:
                assert isinstance(dtype, _DTYPES[feature["dtype"]]), feature
        assert [f["name"] for f in info["features"]] == frame.columns
        splits[entry["split"]] = frame
    return splits


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Three PEPs and a pre-chunked JSONL export of a help centre (five services, the user's own ids),
    run through `qa-pipeline run --multihop` against the simulator."""
    from qa_pipeline.simulator.process import start_simulator_process

    root = tmp_path_factory.mktemp("formats")
    data_dir = root / "data"
    (data_dir / "sources").mkdir(parents=True)
    (root / "dagster_home").mkdir()
    copy_sample(data_dir, *PEPS)
    lines = []
    for s, service in enumerate(SERVICES):
        for k in range(4):
            content = (
                f"The {service} service handles request type {k}. It retries a failed call {k + 2} times before "
                f"it reports an error. Operators of {service} read the error in the dashboard."
            )
            metadata = {"chunk_id": f"kb-{s}-{k}", "service": service, "heading_hierarchy": [service.title(), f"Type {k}"]}
            lines.append(json.dumps({"content": content, "metadata": metadata}))
    (data_dir / "sources" / "helpcentre.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with start_simulator_process(zero_latency=True) as sim:
        env = cli_env(data_dir, sim.base_url)
        run_cli("run", "--levels", "2", "--sample-size", "4", "--multihop", env=env)
    return env, root


def test_beir_folder_reads_back_with_every_qrel_naming_an_existing_query_and_chunk_and_no_leakage(generated):
    env, root = generated
    out = root / "beir-export"
    run_cli("export", "--out", str(out), "--formats", "jsonl,beir", "--min-evidence", "0.9", env=env)

    rows = {split: read_jsonl(out / f"{split}.jsonl") for split in ("train", "validation", "evaluation")}
    documents = {split: {row["document"] for row in split_rows} for split, split_rows in rows.items()}
    chunk_document = {row["chunk_id"]: row["document"] for split_rows in rows.values() for row in split_rows}
    for beir_split, split in (("train", "train"), ("dev", "validation"), ("test", "evaluation")):
        corpus, queries, qrels = load_beir(out / "beir", beir_split)
        assert set(qrels) == {row["id"] for row in rows[split]}, "every exported question of the split has its qrels"
        for query_id, relevant in qrels.items():
            assert query_id in queries
            assert relevant and all(corpus_id in corpus for corpus_id in relevant)
            # The evidence chunks of a question are chunks of its own split's documents.
            assert {chunk_document.get(c, "?") for c in relevant if c in chunk_document} <= documents[split]
    assert all(rows.values()) and sum(map(len, rows.values())) == len(queries)

    # A multi-hop question is relevant to each of its hop chunks, every one of them in the corpus.
    multihop = [row for split_rows in rows.values() for row in split_rows if row["type"] == "multi_hop"]
    assert multihop, "the export includes the multi-hop pairs"
    for row in multihop:
        split = next(name for name, split_rows in rows.items() if row in split_rows)
        corpus, _, qrels = load_beir(out / "beir", {"train": "train", "validation": "dev", "evaluation": "test"}[split])
        assert len(row["hop_chunk_ids"]) >= 2 and set(qrels[row["id"]]) == set(row["hop_chunk_ids"])
        for quote, start, end in zip(row["evidence"], row["evidence_starts"], row["evidence_ends"], strict=True):
            # The quote as the passage has it (quotation marks the model put around it are not the passage's).
            assert row["context"][start:end] == quote.strip().strip('"'), "offsets point into the joined hop passages"


def test_hf_folder_loads_by_the_datasets_conventions_with_a_card_naming_model_prompt_and_quality(generated):
    env, root = generated
    out = root / "hf-export"
    run_cli("export", "--out", str(out), "--formats", "hf", env=env)

    splits = load_hf_folder(out / "hf")
    assert set(splits) == {"train", "validation", "test"}
    pairs = sql("SELECT (SELECT count(*) FROM qa_pairs) + (SELECT count(*) FROM multihop_pairs) AS n", env)[0]["n"]
    assert sum(frame.height for frame in splits.values()) == pairs
    card = (out / "hf" / "README.md").read_text(encoding="utf-8")
    assert "- model: sim-model" in card and "- prompt version: multihop-v1, qa-v2" in card
    # The generation settings: each max_tokens and temperature with its pairs (a re-ask of an answer cut by
    # max_tokens samples at 0.7 with twice the budget), and the question types, the multi-hop one included.
    everything = "(SELECT type, max_tokens, temperature FROM qa_pairs UNION ALL " \
                 "SELECT type, max_tokens, temperature FROM multihop_pairs)"
    for setting, shown in (("max_tokens", "{:g}"), ("temperature", "{:g}")):
        counts = sql(f"SELECT {setting} AS v, count(*) AS n FROM {everything} GROUP BY v ORDER BY n DESC, v", env)
        listed = ", ".join(f"{shown.format(row['v'])} ({row['n']})" for row in counts)
        assert f"- {setting} (pairs per value): {listed}" in card
    types = sql(f"SELECT type, count(*) AS n FROM {everything} GROUP BY type ORDER BY type", env)
    assert "multi_hop" in {row["type"] for row in types}
    listed = ", ".join(f"{row['type']} {row['n']}" for row in types)
    assert f"- question types (pairs per type): {listed}" in card
    assert "evidence score" in card and "how it was measured" in card.lower()
    train = splits["train"]
    row = train.row(0, named=True)
    start, end = row["evidence_starts"][0], row["evidence_ends"][0]
    assert row["context"][start:end] == row["evidence"][0], "offsets point into the passage as stored"


def test_prechunked_rows_keep_the_users_ids_and_split_by_service(generated):
    env, root = generated
    out = root / "by-service"
    run = run_cli("export", "--out", str(out), "--formats", "jsonl", "--split-by", "service", env=env)

    rows = [row for split in ("train", "validation", "evaluation") for row in read_jsonl(out / f"{split}.jsonl")]
    kb = [row for row in rows if row["document"] == "helpcentre.jsonl"]
    assert {row["source_chunk_id"] for row in kb} == {f"kb-{s}-{k}" for s in range(len(SERVICES)) for k in range(4)}
    assert all(row["service"] == json.loads(row["metadata"])["service"] for row in kb)
    assert all(row["heading_path"][0] == row["service"].title() for row in kb)
    splits_of_service: dict[str, set[str]] = {}
    for row in kb:
        splits_of_service.setdefault(row["service"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of_service.values()), splits_of_service
    assert len({split for splits in splits_of_service.values() for split in splits}) > 1, "one file, several splits"
    assert "warning" not in run.stderr


def test_a_corpus_of_one_file_warns_that_the_other_splits_end_empty(tmp_path):
    storage = Storage(DataLayout(root=tmp_path / "data"))
    chunk = "Invoices are sent on the first day of each month by the billing service."
    write_document(storage, "helpcentre.jsonl", {"c1": chunk, "c2": chunk},
                   {"c1": [("When are invoices sent?", "On the first day of each month.", "factual")]})

    summary = export_dataset(storage, tmp_path / "out", ExportOptions(formats=("jsonl",)))

    assert summary.rows == {"train": 1, "validation": 0, "evaluation": 0}
    assert len(summary.warnings) == 2
    assert "split 'validation' is empty: the 1 exported pairs come from 1 group(s) of 'document'" in summary.warnings[0]
    assert "--split-by" in summary.warnings[0]
