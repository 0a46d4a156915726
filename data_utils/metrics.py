"""Pure metric functions used by the tasks' ``compute_metrics``.

Conventions (all functions):
- Every score is a fraction in [0, 1] (BLEU included; multiply by 100 for the paper's tables).
- ``preds`` and ``refs`` are parallel lists of equal length; a length mismatch or an empty input raises ValueError.
- "Characters" means the text's characters with whitespace removed: the CPM-2 decoders may emit spaces between
  Chinese tokens, and the original ``gen_metric`` split decoded text into characters
  (``reference/original-toolkit.md`` §5.3).

Deliberate departures from the original ``gen_metric`` (§5.3): ROUGE-1/2 are the standard per-sentence F1 of
clipped n-gram overlap (the original reported a corpus-level recall of unique n-gram sets), ROUGE-L uses
F1 (β = 1, as rouge-score and the LCSTS literature) instead of β = 1.2. BLEU-4 keeps the original's smoothing
(nltk ``method3`` = NIST geometric smoothing = sacrebleu ``smooth_method="exp"``).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

from data_utils.math_eval import MathEvalError, evaluate_expression, strip_equation_prefix, values_close

logger = logging.getLogger(__name__)

__all__ = [
    "accuracy",
    "math_value_accuracy",
    "rouge_char",
    "bleu4_char",
    "distinct_n",
    "sacrebleu_zh",
    "pairwise_accuracy",
    "mrr",
    "ndcg",
]


def _check_parallel(preds: Sequence, refs: Sequence, what: str) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{what}: {len(preds)} predictions but {len(refs)} references; they must be parallel")
    if len(preds) == 0:
        raise ValueError(f"{what}: no examples to score")


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: float, pred_total: int, ref_total: int) -> float:
    if overlap == 0 or pred_total == 0 or ref_total == 0:
        return 0.0
    precision, recall = overlap / pred_total, overlap / ref_total
    return 2 * precision * recall / (precision + recall)


def accuracy(preds: list, refs: list) -> float:
    """Fraction of positions where ``preds[i] == refs[i]`` (any comparable values: label ids, strings)."""
    _check_parallel(preds, refs, "accuracy")
    return sum(p == r for p, r in zip(preds, refs)) / len(preds)


def math_value_accuracy(preds: list[str], refs: list[str], tol: float = 1e-4) -> float:
    """Fraction of predicted equations whose value matches the gold equation's value.

    Both sides may carry a leading ``x=``. Values are compared by ``math_eval.values_close``
    (|p - g| <= tol * max(1, |g|)). An unparsable prediction counts as wrong; an unparsable reference
    also counts as wrong (nothing can match it) and is logged as a warning with its index, because it
    means the gold data is broken.
    """
    _check_parallel(preds, refs, "math_value_accuracy")
    correct = 0
    bad_refs: list[int] = []
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        try:
            gold = evaluate_expression(strip_equation_prefix(ref))
        except MathEvalError:
            bad_refs.append(i)
            continue
        try:
            value = evaluate_expression(strip_equation_prefix(pred))
        except MathEvalError:
            continue  # a model may emit anything; only a valid expression with the right value scores
        correct += values_close(value, gold, tol)
    if bad_refs:
        logger.warning("%d of %d reference equations do not evaluate (first indices: %s); scored as wrong",
                       len(bad_refs), len(refs), bad_refs[:10])
    return correct / len(preds)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_char(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Character-level ROUGE F1, averaged over sentence pairs.

    Returns ``{"rouge-1", "rouge-2", "rouge-l"}``: ROUGE-n F1 uses clipped n-gram overlap
    (min of the counts), ROUGE-L F1 uses the LCS length; a pair with an empty side scores 0.
    Matches ``rouge_score.RougeScorer(..., tokenizer=<char tokenizer>)`` fmeasure means.
    """
    _check_parallel(preds, refs, "rouge_char")
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for pred, ref in zip(preds, refs):
        p, r = _chars(pred), _chars(ref)
        for n in (1, 2):
            pred_grams, ref_grams = _ngrams(p, n), _ngrams(r, n)
            overlap = sum((pred_grams & ref_grams).values())
            totals[f"rouge-{n}"] += _f1(overlap, sum(pred_grams.values()), sum(ref_grams.values()))
        totals["rouge-l"] += _f1(_lcs_length(p, r), len(p), len(r))
    return {key: value / len(preds) for key, value in totals.items()}


def bleu4_char(preds: list[str], refs: list[str]) -> float:
    """Corpus BLEU-4 over characters, one reference per prediction, in [0, 1].

    Clipped n-gram counts (n = 1..4) are summed over the corpus; brevity penalty exp(1 - R/H) when the total
    hypothesis length H is below the total reference length R. Smoothing: NIST geometric (the original's nltk
    ``SmoothingFunction().method3``, sacrebleu ``smooth_method="exp"``): the k-th order with zero matches gets
    precision 1 / (2^k * total_n). No matches at all, or an order with no hypothesis n-grams, gives 0
    (as sacrebleu). Equals ``sacrebleu.corpus_bleu(preds, [refs], tokenize="char").score / 100``.
    """
    _check_parallel(preds, refs, "bleu4_char")
    correct, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        p, r = _chars(pred), _chars(ref)
        hyp_len += len(p)
        ref_len += len(r)
        for n in range(1, 5):
            pred_grams = _ngrams(p, n)
            correct[n - 1] += sum((pred_grams & _ngrams(r, n)).values())
            total[n - 1] += sum(pred_grams.values())
    if not any(correct) or not all(total):
        return 0.0
    log_precision = 0.0
    zero_orders = 0
    for n_correct, n_total in zip(correct, total):
        if n_correct == 0:
            zero_orders += 1
            log_precision += math.log(1.0 / (2**zero_orders * n_total))
        else:
            log_precision += math.log(n_correct / n_total)
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision / 4)


def distinct_n(preds: list[str], n: int) -> float:
    """Corpus-level Distinct-n over characters: |unique n-grams| / |all n-grams| across all predictions.

    N-grams never cross prediction boundaries; 0.0 when no prediction is n characters long.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n={n} must be >= 1")
    if len(preds) == 0:
        raise ValueError("distinct_n: no examples to score")
    grams: Counter = Counter()
    for pred in preds:
        grams.update(_ngrams(_chars(pred), n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def sacrebleu_zh(preds: list[str], refs: list[str]) -> float:
    """sacreBLEU corpus score with the ``zh`` tokenizer (WMT en->zh convention), divided by 100 into [0, 1].

    Uses sacrebleu's defaults otherwise (BLEU-4, ``exp`` smoothing, one reference per prediction).
    """
    _check_parallel(preds, refs, "sacrebleu_zh")
    import sacrebleu  # runtime dependency (requirements.txt); imported here so the other metrics load without it

    return sacrebleu.corpus_bleu(list(preds), [list(refs)], tokenize="zh").score / 100.0


def pairwise_accuracy(pos_scores: Sequence[float], neg_scores: Sequence[float]) -> float:
    """Fraction of (positive, negative) pairs with pos > neg; a tie counts as wrong (the original's Sogou metric)."""
    _check_parallel(pos_scores, neg_scores, "pairwise_accuracy")
    return sum(p > n for p, n in zip(pos_scores, neg_scores)) / len(pos_scores)


def _ranked_relevance(scores: Sequence[float], relevance: Sequence[float]) -> list[float]:
    """Relevance labels in ranking order: score descending; ties put the less relevant first.

    The pessimistic tie-break means a constant scorer cannot get credit from the input order.
    """
    if len(scores) != len(relevance):
        raise ValueError(f"a query has {len(scores)} scores but {len(relevance)} relevance labels")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], relevance[i]))
    return [relevance[i] for i in order]


def _per_query(scores_per_query, relevance_per_query, what: str, score_fn) -> float:
    _check_parallel(scores_per_query, relevance_per_query, what)
    values = []
    for scores, relevance in zip(scores_per_query, relevance_per_query):
        if not any(rel > 0 for rel in relevance):
            continue  # no relevant document: the query carries no ranking signal (TREC practice)
        values.append(score_fn(_ranked_relevance(scores, relevance)))
    if not values:
        raise ValueError(f"{what}: no query has a document with relevance > 0")
    skipped = len(scores_per_query) - len(values)
    if skipped:
        logger.info("%s: skipped %d of %d queries without relevant documents", what, skipped, len(scores_per_query))
    return sum(values) / len(values)


def mrr(scores_per_query: list[list[float]], relevance_per_query: list[list[float]]) -> float:
    """Mean reciprocal rank of the first document with relevance > 0.

    Inputs: for each query, the model's scores of its documents and their relevance labels (parallel lists).
    Queries without a relevant document are skipped; ties in score rank the less relevant first.
    """
    def reciprocal_rank(ranked: list[float]) -> float:
        return next(1.0 / (rank + 1) for rank, rel in enumerate(ranked) if rel > 0)

    return _per_query(scores_per_query, relevance_per_query, "mrr", reciprocal_rank)


def ndcg(scores_per_query: list[list[float]], relevance_per_query: list[list[float]], k: int | None = None) -> float:
    """Mean NDCG@k (all documents when ``k`` is None) with gain 2^rel - 1 and discount 1 / log2(rank + 1).

    The exponential gain is the Burges et al. (2005) form used by LETOR and LightGBM; for binary labels it equals
    the linear gain. IDCG sorts the same labels ideally, cut at k. Queries without a relevant document are
    skipped; ties in score rank the less relevant first.
    """
    if k is not None and k < 1:
        raise ValueError(f"ndcg: k={k} must be >= 1 or None")

    def dcg(ranked: Sequence[float]) -> float:
        cut = ranked if k is None else ranked[:k]
        return sum((2.0**rel - 1.0) / math.log2(rank + 2) for rank, rel in enumerate(cut))

    def ndcg_one(ranked: list[float]) -> float:
        return dcg(ranked) / dcg(sorted(ranked, reverse=True))

    return _per_query(scores_per_query, relevance_per_query, "ndcg", ndcg_one)
