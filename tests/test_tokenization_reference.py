"""The fast tokenizer equals the plain re-implementation of the original algorithm on real C3 / CCPM text."""
import pytest

from original_tokenizer_ref import ReferenceTokenizer, c3_texts, ccpm_texts
from tokenization import segment
from tokenization_enc_dec import EncDecTokenizer


@pytest.fixture
def real_texts(shared_data):
    # A slice keeps the test at a few seconds; the benchmark compares on all of it.
    return c3_texts(shared_data / "c3", max_docs=150) + ccpm_texts(shared_data / "ccpm", max_lines=150)


def test_jieba_blocks_are_independent(real_texts):
    # The identity the block cache rests on (tokenization/segment.py).
    for text in real_texts:
        pieces = [p for block in segment.split_blocks(text) for p in segment.cut_block(block)]
        assert pieces == segment.cut_text(text)


@pytest.mark.parametrize("vocab", ["cn_vocab", "cn_en_vocab"])
def test_fast_equals_reference_on_real_text(vocab, real_texts, request):
    path = request.getfixturevalue(vocab)
    fast, ref = EncDecTokenizer(path), ReferenceTokenizer(str(path))
    for text in real_texts:
        assert fast.encode(text) == ref.encode(text), text
    # The same again through the warm caches and the batch API.
    assert fast.encode_batch(real_texts, num_workers=1) == [ref.encode(t) for t in real_texts]
