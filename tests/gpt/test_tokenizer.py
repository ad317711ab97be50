from gpt.tokenizer import EOT_ID, asset_path, decode, encode, get_tokenizer

BOOK_SENTENCE = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680,
            27271, 13]


def test_book_sentence_round_trip():
    assert encode(BOOK_SENTENCE) == BOOK_IDS
    assert decode(BOOK_IDS) == BOOK_SENTENCE


def test_endoftext_is_50256_and_vocab_size():
    tok = get_tokenizer()
    assert tok.eot_token == EOT_ID == 50256
    assert tok.n_vocab == 50257


def test_the_verdict_has_5145_tokens():
    with open(asset_path("the-verdict.txt"), encoding="utf-8") as f:
        assert len(encode(f.read())) == 5145


def test_special_token_can_be_refused():
    ids = encode("a <|endoftext|> b", allow_special=False)
    assert EOT_ID not in ids and decode(ids) == "a <|endoftext|> b"


def test_decode_rejects_ids_outside_the_vocabulary():
    import pytest

    with pytest.raises(ValueError, match="outside GPT-2's vocabulary"):
        decode([1, 50257])
