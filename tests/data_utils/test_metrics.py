"""data_utils/metrics.py against hand-worked examples and the reference libraries (rouge-score, sacrebleu, nltk)."""
import math
import random

import pytest

from data_utils import metrics


class CharTokenizer:
    """rouge-score tokenizer object: one token per non-space character (as metrics._chars)."""

    def tokenize(self, text):
        return [c for c in text if not c.isspace()]


ZH_PREDS = ["今天天气很好我们去公园", "北京是中国的首都", "他喜欢吃苹果", "会议在下午三点开始", "好"]
ZH_REFS = ["今天天气不错我们去公园散步", "中国的首都是北京", "他很喜欢吃香蕉和苹果", "下午三点开始开会", "不好"]


def _random_zh(rng, alphabet="天气很好北京中国首都我们公园", lo=1, hi=15):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def test_accuracy_hand():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy(["相似"], ["相似"]) == 1.0


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.bleu4_char, metrics.rouge_char, metrics.pairwise_accuracy])
def test_mismatched_or_empty_inputs_raise(fn):
    with pytest.raises(ValueError, match="parallel"):
        fn(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no examples"):
        fn([], [])


def test_math_value_accuracy_values_not_tokens():
    preds = ["(1+2)*3", "x=9", "3*3.00001", "9.1", "__import__('os')", "((3)/(4))"]
    refs = ["x=3*3", "3*3", "9", "9", "9", "75%"]
    # equal value, prefix stripped, within 1e-4 relative (9e-5 off), off, unparsable, fraction == percent
    assert metrics.math_value_accuracy(preds, refs) == pytest.approx(4 / 6)


def test_math_value_accuracy_bad_reference_is_wrong_and_logged(caplog):
    assert metrics.math_value_accuracy(["1", "2"], ["1", "2+"]) == 0.5
    assert "do not evaluate" in caplog.text


def test_rouge_char_hand_example():
    # pred 我爱北京 / ref 我爱上海: unigrams 2 of 4 overlap -> P=R=F=0.5; bigrams {我爱} 1 of 3 -> 1/3;
    # LCS 我爱 = 2 -> 0.5.
    got = metrics.rouge_char(["我爱北京"], ["我爱上海"])
    assert got == pytest.approx({"rouge-1": 0.5, "rouge-2": 1 / 3, "rouge-l": 0.5})
    # repeated chars are clipped: pred 好好好 vs ref 好: overlap 1, P=1/3, R=1 -> F=0.5
    assert metrics.rouge_char(["好好好"], ["好"])["rouge-1"] == pytest.approx(0.5)
    # an empty side scores 0; spaces are ignored
    assert metrics.rouge_char([""], ["好"])["rouge-l"] == 0.0
    assert metrics.rouge_char(["我 爱"], ["我爱"])["rouge-2"] == 1.0


def test_rouge_char_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharTokenizer())
    rng = random.Random(0)
    preds = ZH_PREDS + [_random_zh(rng) for _ in range(40)]
    refs = ZH_REFS + [_random_zh(rng) for _ in range(40)]
    scores = [scorer.score(ref, pred) for pred, ref in zip(preds, refs)]  # score(target, prediction)
    expected = {
        key: sum(s[name].fmeasure for s in scores) / len(scores)
        for key, name in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL"))
    }
    got = metrics.rouge_char(preds, refs)
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_bleu4_char_hand_example():
    # pred ABCDE vs ref ABCDF (chars): 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2, equal length -> BP 1.
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert metrics.bleu4_char(["甲乙丙丁戊"], ["甲乙丙丁己"]) == pytest.approx(expected)
    # 4-grams with no match get NIST smoothing 1/(2 * total): pred 甲乙丙己戊 vs 甲乙丙丁戊
    # 1: 4/5, 2: 2/4, 3: 1/3, 4: 0/2 -> 1/(2*2)
    expected = (4 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25
    assert metrics.bleu4_char(["甲乙丙己戊"], ["甲乙丙丁戊"]) == pytest.approx(expected)
    # brevity penalty: pred 甲乙丙丁 vs ref 甲乙丙丁戊 -> all precisions 1, BP = exp(1 - 5/4)
    assert metrics.bleu4_char(["甲乙丙丁"], ["甲乙丙丁戊"]) == pytest.approx(math.exp(1 - 5 / 4))
    assert metrics.bleu4_char(["甲"], ["乙"]) == 0.0


def test_bleu4_char_matches_sacrebleu_char_and_zh():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(1)
    preds = ZH_PREDS + [_random_zh(rng, lo=4) for _ in range(30)]
    refs = ZH_REFS + [_random_zh(rng, lo=4) for _ in range(30)]
    got = metrics.bleu4_char(preds, refs)
    # sacrebleu's "char" tokenizer puts a space between characters (spaces vanish on split), default smoothing "exp".
    assert got == pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="char").score / 100, abs=1e-9)
    # On text made only of CJK characters the "zh" tokenizer also isolates every character (it pads each CJK
    # char with spaces and has no non-Chinese runs to keep together), so it coincides with char BLEU.
    assert got == pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score / 100, abs=1e-9)
    assert metrics.sacrebleu_zh(preds, refs) == pytest.approx(got, abs=1e-9)


def test_bleu4_char_matches_nltk_method3():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(2)
    preds = [_random_zh(rng, lo=6) for _ in range(30)]
    refs = [_random_zh(rng, lo=6) for _ in range(30)]
    expected = bleu_score.corpus_bleu(
        [[list(r)] for r in refs], [list(p) for p in preds],
        smoothing_function=bleu_score.SmoothingFunction().method3,
    )
    assert metrics.bleu4_char(preds, refs) == pytest.approx(expected, abs=1e-9)


def test_sacrebleu_zh_mixed_text_is_a_fraction():
    score = metrics.sacrebleu_zh(["我喜欢 Python 编程。"], ["我喜欢 Python 编程。"])
    assert score == pytest.approx(1.0)


def test_distinct_n_hand():
    # chars of "好好好" -> bigrams 好好, 好好 (1 unique of 2); "好的" -> 好的 (new): 2 unique / 3 total
    assert metrics.distinct_n(["好好好", "好的"], 2) == pytest.approx(2 / 3)
    # n-grams never span predictions: "甲乙" + "丙" has only one bigram
    assert metrics.distinct_n(["甲乙", "丙"], 2) == 1.0
    assert metrics.distinct_n(["甲"], 4) == 0.0
    with pytest.raises(ValueError):
        metrics.distinct_n(["甲"], 0)


def test_pairwise_accuracy_ties_are_wrong():
    assert metrics.pairwise_accuracy([2.0, 1.0, 0.5, 3.0], [1.0, 1.0, 0.7, -1.0]) == 0.5


def test_mrr_hand():
    scores = [[0.1, 0.9, 0.5], [3.0, 2.0, 1.0], [1.0, 1.0]]
    rel = [[1, 0, 0], [0, 0, 1], [0, 1]]
    # q1: ranking 0.9(0), 0.5(0), 0.1(1) -> 1/3; q2: relevant ranked 3rd -> 1/3; q3: tie -> pessimistic -> 1/2
    assert metrics.mrr(scores, rel) == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert metrics.mrr([[0.2, 0.8]], [[0, 1]]) == 1.0


def test_mrr_skips_queries_without_relevant_docs():
    assert metrics.mrr([[0.2, 0.8], [1.0, 2.0]], [[0, 1], [0, 0]]) == 1.0
    with pytest.raises(ValueError, match="relevance > 0"):
        metrics.mrr([[1.0]], [[0]])


def test_ndcg_hand():
    # scores rank docs as rel [3, 2, 0, 1]; gains 7, 3, 0, 1; discounts 1, 1/log2 3, 1/2, 1/log2 5
    scores = [[0.9, 0.8, 0.7, 0.6]]
    rel = [[3, 2, 0, 1]]
    dcg = 7 + 3 / math.log2(3) + 0 + 1 / math.log2(5)
    idcg = 7 + 3 / math.log2(3) + 1 / 2
    assert metrics.ndcg(scores, rel) == pytest.approx(dcg / idcg)
    # @2: the top two are already ideal
    assert metrics.ndcg(scores, rel, k=2) == pytest.approx(1.0)
    # binary: relevant doc at rank 2 of 2 -> (1/log2 3) / 1
    assert metrics.ndcg([[0.9, 0.1]], [[0, 1]]) == pytest.approx(1 / math.log2(3))
    with pytest.raises(ValueError):
        metrics.ndcg(scores, rel, k=0)
