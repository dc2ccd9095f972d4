"""The export's folders for retrieval evaluation and sharing: BEIR (corpus, queries, qrels) and a Hugging
Face dataset folder (Parquet per split and a README.md dataset card that `datasets.load_dataset` reads)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import polars as pl
import yaml

from qa_pipeline.core.evidence import FUZZY_MIN_SCORE, ChunkText
from qa_pipeline.core.storage import write_parquet_atomic, write_text_atomic

# The export's split names as BEIR and Hugging Face call them.
BEIR_SPLITS = {"train": "train", "validation": "dev", "evaluation": "test"}
HF_SPLITS = {"train": "train", "validation": "validation", "evaluation": "test"}


def evidence_chunks(records: pl.DataFrame, chunks: pl.DataFrame) -> dict[str, list[str]]:
    """query id → the chunks holding its evidence. A pair whose evidence is found in its chunk is also
    relevant to every other chunk of its document that holds all its quotes word for word (chunks
    overlap); a pair whose evidence is not found keeps the chunk it was written from. A multi-hop pair
    is relevant to each of its hop chunks: a retriever must find all of them."""
    by_document: dict[str, list[tuple[str, ChunkText]]] = defaultdict(list)
    for document, chunk_id, content in chunks.select("document", "chunk_id", "content").iter_rows():
        by_document[document].append((chunk_id, ChunkText(content)))
    relevant: dict[str, list[str]] = {}
    columns = ("id", "document", "chunk_id", "evidence", "evidence_score", "hop_chunk_ids")
    for query_id, document, chunk_id, quotes, score, hops in records.select(columns).iter_rows():
        if hops is not None and len(hops) > 1:
            relevant[query_id] = list(hops)
            continue
        found = [chunk_id]
        if quotes and (score or 0.0) >= FUZZY_MIN_SCORE:
            found += [
                other for other, text in by_document.get(document, ())
                if other != chunk_id and all(text.contains(quote) for quote in quotes)
            ]
        relevant[query_id] = found
    return relevant


def write_beir(out_dir: Path, records: pl.DataFrame, chunks: pl.DataFrame) -> list[Path]:
    """`corpus.jsonl` (every chunk), `queries.jsonl` (every exported question) and `qrels/{split}.tsv`
    (query-id, corpus-id, score 1 for each evidence chunk), as BEIR's GenericDataLoader reads them."""
    folder = out_dir / "beir"
    corpus_lines = []
    for row in chunks.sort("document", "position").iter_rows(named=True):
        entry = {
            "_id": row["chunk_id"],
            "title": " > ".join(row["heading_path"] or []) or row["document"],
            "text": row["content"],
            "metadata": _user_ids(row, document=row["document"]),
        }
        corpus_lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
    query_lines = []
    for row in records.iter_rows(named=True):
        metadata = {
            "split": BEIR_SPLITS[row["split"]],
            "answer": row["answer"],
            "type": row["type"],
            "difficulty": row["difficulty"],
            "evidence": row["evidence"],
            "hop_chunk_ids": row["hop_chunk_ids"],
            **_user_ids(row, document=row["document"], chunk_id=row["chunk_id"]),
        }
        query_lines.append(json.dumps({"_id": row["id"], "text": row["question"], "metadata": metadata},
                                      ensure_ascii=False) + "\n")
    relevant = evidence_chunks(records, chunks)
    files = [
        _write(folder / "corpus.jsonl", "".join(corpus_lines)),
        _write(folder / "queries.jsonl", "".join(query_lines)),
    ]
    for split, name in BEIR_SPLITS.items():
        ids = records.filter(pl.col("split") == split)["id"].to_list()
        lines = ["query-id\tcorpus-id\tscore\n"] + [f"{q}\t{c}\t1\n" for q in ids for c in relevant[q]]
        files.append(_write(folder / "qrels" / f"{name}.tsv", "".join(lines)))
    return files


def _user_ids(row: Mapping, **extra: str) -> dict:
    """The ids and metadata a pre-chunked input brought (nothing for documents the pipeline chunked)."""
    metadata = json.loads(row.get("metadata") or row.get("metadata_json") or "{}")
    ids = {name: row.get(name) for name in ("source_chunk_id", "service", "doc_type")}
    return {**extra, **{key: value for key, value in ids.items() if value is not None},
            **({"metadata": metadata} if metadata else {})}


def _feature(dtype: pl.DataType) -> dict:
    """A column's type as a dataset card's `features` entry."""
    if isinstance(dtype, pl.List):
        return {"sequence": _feature(dtype.inner)["dtype"]}
    names = {pl.String: "string", pl.Int32: "int32", pl.Int64: "int64", pl.Float64: "float64", pl.Boolean: "bool"}
    for polars_type, name in names.items():
        if isinstance(dtype, polars_type):
            return {"dtype": name}
    raise TypeError(f"no dataset feature type for {dtype}")


def write_hf(out_dir: Path, records: pl.DataFrame, card_text: str, title: str) -> list[Path]:
    """`data/{split}-00000-of-00001.parquet` for each non-empty split and a README.md whose YAML header
    (configs, features, splits and sizes) is what `datasets.load_dataset(folder)` follows."""
    folder = out_dir / "hf"
    files, splits, data_files = [], [], []
    frame = records.drop("split")
    for split, name in HF_SPLITS.items():
        part = records.filter(pl.col("split") == split).drop("split")
        if part.height == 0:
            continue
        relative = f"data/{name}-00000-of-00001.parquet"
        write_parquet_atomic(part, folder / relative)
        files.append(folder / relative)
        data_files.append({"split": name, "path": relative})
        splits.append({"name": name, "num_bytes": (folder / relative).stat().st_size, "num_examples": part.height})
    size = sum(split["num_bytes"] for split in splits)
    header = {
        "configs": [{"config_name": "default", "data_files": data_files}],
        "dataset_info": {
            "features": [{"name": name, **_feature(dtype)} for name, dtype in frame.schema.items()],
            "splits": splits,
            "download_size": size,
            "dataset_size": size,
        },
        "task_categories": ["question-answering", "text-retrieval"],
        "size_categories": [_size_category(records.height)],
        "pretty_name": title,
    }
    card = "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n" + card_text
    files.append(_write(folder / "README.md", card))
    return files


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "n>1M"


def _write(path: Path, text: str) -> Path:
    write_text_atomic(text, path)
    return path
