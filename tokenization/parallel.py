"""`encode_batch`: tokenise many texts over worker processes (jieba is pure Python, so threads do not help)."""
from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, List, Optional, Sequence

# Below this many characters in total a pool costs more than it saves: starting and feeding the workers takes
# ~0.05-0.1 s, while jieba segments roughly 0.5-1 M characters/s per core.
MIN_PARALLEL_CHARS = 200_000

# Contiguous chunks per worker: enough for load balancing, few enough that neighbouring texts (a C3 passage
# repeated for each of its questions) mostly land in the same worker and share its caches.
CHUNKS_PER_WORKER = 4

_worker_tokenizer: Any = None


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def encode_batch(tokenizer: Any, texts: Sequence[str], num_workers: Optional[int] = None) -> List[List[int]]:
    """`[tokenizer.encode(t) for t in texts]`, in order, computed by `num_workers` processes for large inputs.

    num_workers=None uses every available CPU; 0 or 1 (or a small input, or a caller that is itself a daemonic
    worker, e.g. a DataLoader worker, which may not start children) runs in this process.
    """
    texts = list(texts)
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0 (0 or 1 = in-process, None = all CPUs)")
    workers = available_cpus() if num_workers is None else num_workers
    workers = min(workers, len(texts))
    if workers <= 1 or sum(map(len, texts)) < MIN_PARALLEL_CHARS or mp.current_process().daemon:
        return [tokenizer.encode(text) for text in texts]
    return _encode_in_pool(tokenizer, texts, workers)


def _encode_in_pool(tokenizer: Any, texts: List[str], workers: int) -> List[List[int]]:
    tokenizer.prepare_for_workers()  # load jieba's dict before forking so the children inherit it
    # fork shares the loaded tokenizer and jieba dict for free; spawn (other platforms) pickles the tokenizer,
    # which rebuilds itself from its vocab file.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    chunks = _contiguous_chunks(texts, workers * CHUNKS_PER_WORKER)
    with mp.get_context(method).Pool(workers, initializer=_set_worker_tokenizer, initargs=(tokenizer,)) as pool:
        parts = pool.map(_encode_chunk, chunks, chunksize=1)
    return [ids for part in parts for ids in part]


def _contiguous_chunks(items: List[str], n_chunks: int) -> List[List[str]]:
    size = -(-len(items) // n_chunks)  # ceil
    return [items[i:i + size] for i in range(0, len(items), size)]


def _set_worker_tokenizer(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: List[str]) -> List[List[int]]:
    return [_worker_tokenizer.encode(text) for text in texts]
