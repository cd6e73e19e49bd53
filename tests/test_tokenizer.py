"""Tokenizer against transformers.BertTokenizerFast on the real CS224N sentences and edge cases."""
import csv
import shutil

import pytest
import torch
import transformers

from mtbert import Tokenizer

EDGE_CASES = [
    "",
    "   \t  ",
    "Café naïve façade — Ünïcödé, 日本語のテキスト, emoji 😀 and Ελληνικά!",
    "It's a self-evident truth: U.S.A. costs $5.99 (approx.)... right?!",
    " ".join(["supercalifragilisticexpialidocious", "word"] * 1000),  # 2,000 words: truncated
]


def read_column(path, *columns):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [tuple(row[c] for c in columns) for row in rows if all(row.get(c) is not None for c in columns)]


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab.txt"])
def tokenizers_pair(request, minilm_dir, tmp_path_factory):
    """(ours, reference) built from the model's tokenizer.json, or from its vocab.txt alone."""
    if request.param == "tokenizer.json":
        return Tokenizer.from_pretrained(minilm_dir), transformers.BertTokenizerFast.from_pretrained(minilm_dir)
    vocab_only = tmp_path_factory.mktemp("vocab_only")
    shutil.copy(minilm_dir / "vocab.txt", vocab_only / "vocab.txt")
    reference = transformers.BertTokenizerFast.from_pretrained(vocab_only)
    return Tokenizer.from_pretrained(vocab_only), reference


def assert_same_batch(ours, reference, texts, pairs=None, max_length=512):
    got = ours(texts, pairs, max_length=max_length)
    want = reference(texts, pairs, padding="longest", truncation="longest_first", max_length=max_length,
                     return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert got[key].dtype == torch.long
        assert torch.equal(got[key], want[key]), key


def test_sst_dev_sentences_match_transformers(tokenizers_pair, data_dir):
    sentences = [s for (s,) in read_column(data_dir / "ids-sst-dev.csv", "sentence")]
    assert len(sentences) > 1000
    ours, reference = tokenizers_pair
    for start in range(0, len(sentences), 128):
        assert_same_batch(ours, reference, sentences[start:start + 128])


def test_sts_dev_pairs_match_transformers(tokenizers_pair, data_dir):
    pairs = read_column(data_dir / "sts-dev.csv", "sentence1", "sentence2")
    assert len(pairs) > 800
    ours, reference = tokenizers_pair
    for start in range(0, len(pairs), 128):
        chunk = pairs[start:start + 128]
        assert_same_batch(ours, reference, [a for a, _ in chunk], [b for _, b in chunk])


@pytest.mark.parametrize("text", EDGE_CASES, ids=["empty", "whitespace", "non-ascii", "punctuation", "2000-words"])
def test_edge_cases_match_transformers(tokenizers_pair, text):
    ours, reference = tokenizers_pair
    assert_same_batch(ours, reference, [text, "a short one"])
    assert_same_batch(ours, reference, [text], [EDGE_CASES[2]], max_length=64)


def test_truncation_and_special_tokens(minilm_dir):
    tokenizer = Tokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(EDGE_CASES[-1])
    assert batch["input_ids"].shape == (1, tokenizer.model_max_length)
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id and batch["input_ids"][0, -1] == tokenizer.sep_token_id
    pair = tokenizer("first sentence", "the second one")
    sep = (pair["input_ids"][0] == tokenizer.sep_token_id).nonzero().flatten()
    assert pair["token_type_ids"][0, : sep[0] + 1].eq(0).all() and pair["token_type_ids"][0, sep[0] + 1:].eq(1).all()


@pytest.mark.parametrize("call, argument", [
    (lambda t: t(["a", "b"], ["c"]), "text_pair"),
    (lambda t: t([3]), "text"),
    (lambda t: t([]), "text"),
    (lambda t: t("a", max_length=1), "max_length"),
    (lambda t: t("a", return_tensors="np"), "return_tensors"),
])
def test_bad_arguments_name_the_argument(minilm_dir, call, argument):
    with pytest.raises(ValueError, match=argument):
        call(Tokenizer.from_pretrained(minilm_dir))
