import numpy as np
import pytest
import torch

from gpt.data import (
    SlidingWindowDataset,
    load_token_file,
    load_tokens,
    split_tokens,
    tokenize_to_file,
)
from gpt.tokenizer import EOT_ID, encode


def test_windows_and_shifted_targets():
    tokens = list(range(100, 120))  # 20 tokens
    ds = SlidingWindowDataset(tokens, context_length=4, stride=3)
    assert len(ds) == len(range(0, 20 - 4, 3))  # the book's range(0, len - L, stride)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.tolist() == tokens[3 * i:3 * i + 4]
        assert y.tolist() == tokens[3 * i + 1:3 * i + 5]
        assert x.dtype == torch.int64


def test_windows_of_the_verdict_start_like_the_book():
    text = open(__import__("gpt.data").data.default_text_path(), encoding="utf-8").read()
    ds = SlidingWindowDataset(encode(text), context_length=4, stride=4)
    x = torch.stack([ds[i][0] for i in range(8)])  # (8, 4): the book's first batch of its chapter 2 loader
    y = torch.stack([ds[i][1] for i in range(8)])  # (8, 4)
    assert x[0].tolist() == [40, 367, 2885, 1464]  # "I HAD always" in the book's chapter 2
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])  # windows follow each other


def test_split_by_ratio():
    train, val = split_tokens(list(range(100)), 0.1)
    assert len(train) == 90 and len(val) == 10 and train[-1] + 1 == val[0]
    with pytest.raises(ValueError, match="val_ratio"):
        split_tokens([1, 2, 3], 1.5)


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        SlidingWindowDataset([1, 2, 3], context_length=8)


def test_memory_mapped_token_file(tmp_path):
    docs = tmp_path / "corpus"
    docs.mkdir()
    texts = ["The first document.\nIt has two lines.\n", "A second one, longer " * 50]
    for i, t in enumerate(texts):
        (docs / f"{i}.txt").write_text(t)
    out = tokenize_to_file(docs, tmp_path / "c.tokens.u16", chunk_bytes=64)  # many chunks per file
    mm = load_token_file(out)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    expected = encode(texts[0], allow_special=False) + [EOT_ID] + encode(texts[1], allow_special=False) + [EOT_ID]
    assert mm.tolist() == expected
    ds = SlidingWindowDataset(mm, context_length=16, stride=8)
    x, y = ds[len(ds) - 1]
    assert x.dtype == torch.int64 and torch.equal(x[1:], y[:-1])
    again = load_tokens(docs, cache_dir=tmp_path)  # a directory goes through the cached token file
    assert again.tolist() == expected


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_tokens(tmp_path / "empty.txt")
