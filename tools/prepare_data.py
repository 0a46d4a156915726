"""Convert a task's public data release into the CPM-2 layout files ``DIR/{train,dev,test}<ext>``.

    python tools/prepare_data.py --task lcqmc --src LCQMC/ --out data/lcqmc/

The task's own reader does the parsing (``data_utils.tasks.get_task(name).read_split``, which accepts the public
layout and its split names, e.g. CCPM's ``valid.jsonl`` as dev and ``test_public.jsonl`` as test); this tool only
maps each raw example back to the CPM-2 field layout (SPEC §6) and writes it in the CPM-2 container (JSON lines or
one JSON list) with the task's CPM-2 extension. The mapping per task is data in ``CONVERSIONS`` below, because the
raw dicts are the readers' normalised fields, not the CPM-2 ones (CCPM's ``label`` is CPM-2's ``answer``, C3's
questions are regrouped into documents, ...).

Every output file is written atomically (temp file + ``os.replace``) and then read back with the same task reader;
the tool fails if the raw examples differ, so a converted folder always reads as the release did.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_utils.errors import DataError  # noqa: E402
from data_utils.tasks import get_task, task_names  # noqa: E402

logger = logging.getLogger("prepare_data")

SPLITS = ("train", "dev", "test")


def _fields(mapping: dict[str, str]) -> Callable[[dict], dict]:
    """A record builder copying ``raw[src]`` to ``out[dst]`` for each ``dst: src``; None / absent are left out
    (an unlabelled test file has no label field, as in the CPM-2 release)."""

    def build(raw: dict) -> dict:
        return {dst: raw[src] for dst, src in mapping.items() if raw.get(src) is not None}

    return build


def _c3_documents(raws: Sequence[dict]) -> list[Any]:
    """C3 raw examples are one per question; CPM-2 groups them as ``[[context lines], [questions], doc_id]``.

    Consecutive questions sharing a context form one document (the reader emits a document's questions in a row);
    the doc id is the question id without its ``-N`` suffix when the reader made it (``{doc_id}-{N}``).
    """
    documents: list[list[Any]] = []
    previous: Optional[str] = None
    for raw in raws:
        question = {"question": raw["question"], "choice": raw["choices"], "id": raw["id"]}
        if raw.get("label") is not None:
            question["answer"] = raw["choices"][raw["label"]]
        if raw["context"] != previous:
            doc_id = str(raw["id"]).rsplit("-", 1)[0] if "-" in str(raw["id"]) else f"doc{len(documents)}"
            documents.append([raw["context"].split("\n"), [], doc_id])
            previous = raw["context"]
        documents[-1][1].append(question)
    return documents


def _sogou_record(raw: dict) -> dict:
    """Pairs (no doc ids) back to ``{query, pos_doc, neg_doc}``; lists to ``{query_id, query, doc[{...}]}``."""
    if raw["doc_ids"] is None:
        return {"id": raw["id"], "query": raw["query"], "pos_doc": raw["docs"][0], "neg_doc": raw["docs"][1]}
    docs = [{"sogou_id": doc_id, "title": title} for doc_id, title in zip(raw["doc_ids"], raw["docs"])]
    for doc, relevance in zip(docs, raw["relevance"] or []):
        doc["label"] = relevance
    return {"query_id": raw["id"], "query": raw["query"], "doc": docs}


@dataclass(frozen=True)
class Conversion:
    """How one task's raw examples become CPM-2 records.

    container: "jsonl" (one object per line) or "json_list" (one JSON list), as the original loaders read them.
    record: raw example -> CPM-2 record (ignored when ``documents`` is given).
    documents: all raw examples -> the list of top-level items (tasks whose CPM-2 items group several examples).
    """

    container: str
    record: Optional[Callable[[dict], dict]] = None
    documents: Optional[Callable[[Sequence[dict]], list]] = None


# CPM-2 field name <- raw field name (the task readers' normalised dicts, see each data_utils/tasks/<task>.py).
CONVERSIONS: dict[str, Conversion] = {
    "lcqmc": Conversion("jsonl", _fields({"id": "id", "sentence1": "sentence1", "sentence2": "sentence2",
                                          "label": "label"})),
    "ccpm": Conversion("jsonl", _fields({"id": "id", "translation": "translation", "choices": "choices",
                                         "answer": "label"})),
    "c3": Conversion("json_list", documents=_c3_documents),
    "math": Conversion("json_list", _fields({"id": "id", "text": "text", "equation": "equation", "ans": "ans"})),
    "lcsts": Conversion("jsonl", _fields({"id": "id", "text": "text", "summary": "summary"})),
    # PHVM JSON lines; the public copy has no title or tags (the reader gives "" and [])
    "adgen": Conversion("jsonl", _fields({"id": "id", "title": "title", "tags": "tags", "feature": "feature",
                                          "desc": "desc"})),
    # the original's swapped names: the encoder reads "target", the decoder learns "source"
    "wmtencn": Conversion("json_list", _fields({"index": "id", "target": "source_text", "source": "target_text"})),
    "sogou-log": Conversion("jsonl", _sogou_record),
}


def convert(raws: Sequence[dict], conversion: Conversion) -> list:
    """The top-level items to write for one split."""
    if conversion.documents is not None:
        return conversion.documents(raws)
    return [conversion.record(raw) for raw in raws]


def render(items: Sequence[Any], container: str) -> str:
    if container == "jsonl":
        return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    return json.dumps(list(items), ensure_ascii=False, indent=1) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and ``os.replace``: a crash never leaves half a data file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare(task_name: str, src: Path, out: Path, *, splits: Sequence[str] = SPLITS,
            skip_bad_lines: bool = False) -> dict[str, Path]:
    """Convert every split of ``src`` that exists; returns ``{split: written file}``.

    Raises ValueError for an unknown or unsupported task, a missing source, ``out`` equal to ``src``, or when no
    split is found; DataError for bad data (unless ``skip_bad_lines``) or a failed read-back check.
    """
    task = get_task(task_name)
    conversion = CONVERSIONS.get(task.name)
    if conversion is None:
        raise ValueError(f"prepare_data has no CPM-2 conversion for task {task.name!r} yet; supported: "
                         f"{', '.join(sorted(CONVERSIONS))} (add an entry to CONVERSIONS)")
    if not src.exists():
        raise ValueError(f"--src {src} does not exist")
    if src.is_file() and len(splits) != 1:
        raise ValueError(f"--src {src} is one file; name the split it holds with --splits (one of {', '.join(SPLITS)})")
    if out.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise ValueError(f"--out {out} is the source folder; write the CPM-2 files to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split in splits:
        try:
            files = task.split_files(src, split)
        except DataError as err:  # no file for this split in the release: nothing to convert
            logger.info("%s: no %s split (%s)", task.name, split, err.reason)
            continue
        raws = task.read_split(src, split, skip_bad_lines=skip_bad_lines)
        target = out / f"{split}{task.default_ext}"
        write_atomic(target, render(convert(raws, conversion), conversion.container))
        _check_read_back(task, target, split, raws)
        written[split] = target
        logger.info("%s %s: %d examples from %s -> %s", task.name, split, len(raws),
                    ", ".join(f.name for f in files), target)
    if not written:
        raise ValueError(f"no {', '.join(splits)} files for task {task.name!r} under {src}")
    return written


def _check_read_back(task: Any, target: Path, split: str, raws: Sequence[dict]) -> None:
    again = task.read_split(target, split)
    if len(again) != len(raws):
        raise DataError(f"read back {len(again)} examples but converted {len(raws)}", file=target)
    for number, (before, after) in enumerate(zip(raws, again)):
        if before != after:
            raise DataError(f"example {number} reads back as {after!r}, expected {before!r}", file=target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help=f"task name: {', '.join(task_names())}")
    parser.add_argument("--src", required=True, type=Path, help="folder (or file) of the public release")
    parser.add_argument("--out", required=True, type=Path, help="folder for train/dev/test in the CPM-2 layout")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to convert")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed records")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = prepare(args.task, args.src, args.out, splits=args.splits, skip_bad_lines=args.skip_bad_lines)
    except (ValueError, OSError) as err:  # DataError is a ValueError: print the file:line message, no traceback
        logger.error("%s", err)
        return 1
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
