"""Helpers behind `tokenization_enc_dec` (the public module): rules, jieba blocks, parallel batches, SentencePiece."""
