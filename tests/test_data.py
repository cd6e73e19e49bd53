"""mtbert.data: CS224N loaders (real files when present, synthetic malformed files always),
length-bucketed batching, collation."""
import warnings

import pytest
import torch

from mtbert.data import (DEFAULT_FILES, Example, LengthBucketSampler, collate, example_lengths, load_task_file,
                         write_synthetic_data)
from mtbert.multitask.data import rank_share
from mtbert.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_pretrained(minilm_dir)


# -- the real files ------------------------------------------------------------------------------

# (task, file, labeled, rows kept, rows skipped), from the data README and a count by hand.
REAL_FILES = [
    ("sst", "ids-sst-train.csv", True, 8000, 0),
    ("sst", "ids-sst-dev.csv", True, 1101, 0),
    ("sst", "ids-sst-test-student.csv", False, 2210, 0),
    ("para", "quora-train.csv", True, 14212, 2),
    ("para", "quora-dev.csv", True, 2000, 0),
    ("sts", "sts-train.csv", True, 5499, 0),
    ("sts", "sts-dev.csv", True, 863, 0),
    ("sts", "sts-test-student.csv", False, 1725, 0),
]


@pytest.mark.parametrize("task,name,labeled,rows,skipped", REAL_FILES, ids=[f[1] for f in REAL_FILES])
def test_real_file_counts(data_dir, task, name, labeled, rows, skipped):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_task_file(task, data_dir / name)
    assert (len(loaded), loaded.skipped, loaded.labeled) == (rows, skipped, labeled)
    messages = [str(w.message) for w in caught]
    assert len(messages) == (1 if skipped else 0)  # one warning per file, not per row
    if skipped:
        assert name in messages[0] and f"skipped {skipped}" in messages[0]
    assert all(len(e.id) == 25 for e in loaded.examples)
    assert all(all(t.strip() == t and t for t in e.texts) for e in loaded.examples)


def test_real_labels(data_dir):
    sst = load_task_file("sst", data_dir / "ids-sst-dev.csv").examples
    assert sst[0] == Example("a7d575c9ed86ea9633660c67e",
                             ("It 's a lovely film with lovely performances by Buy and Accorsi .",), 3)
    assert {e.label for e in sst} == {0, 1, 2, 3, 4} and all(isinstance(e.label, int) for e in sst)
    quora = load_task_file("para", data_dir / "quora-dev.csv").examples
    assert (quora[0].id, quora[0].label, quora[1].label) == ("0ea4b66fd3a44b1fc11c85e55", 0.0, 1.0)
    assert sum(e.label for e in quora) == 804  # positives counted with awk
    sts = load_task_file("sts", data_dir / "sts-dev.csv").examples
    assert (sts[1].texts, sts[1].label) == (("Two black dogs are playing on the grass.",
                                            "Two black dogs are playing in a grassy plain."), 4.6)
    test = load_task_file("sst", data_dir / "ids-sst-test-student.csv").examples
    assert test[0].texts == ("Effective but too-tepid biopic",) and test[0].label is None


def test_real_malformed_quora_row_is_skipped_not_invented(data_dir):
    with pytest.warns(UserWarning, match="line 1809"):
        quora = load_task_file("para", data_dir / "quora-train.csv").examples
    ids = {e.id for e in quora}
    assert "ad118c967d683c93883bf072d" not in ids  # its quoting swallowed the label column
    assert {"ee53676c7cc2c48f96cd47128", "17e45d292a6721c83f2a881c8"} <= ids  # its neighbours survive


# -- synthetic malformed files -------------------------------------------------------------------

def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_malformed_rows_skipped_and_counted(tmp_path):
    path = _write(tmp_path / "sts.csv", [
        "\tid\tsentence1\tsentence2\tsimilarity",
        "0\taaa\tA man plays.\tA man is playing.\t4.2",
        "1\tbbb\tNo score here.\tNone.\t",  # empty label
        "2\tccc\tToo short",  # missing fields
        "3\tddd\tA.\tB.\tfive",  # label does not parse
        "4\teee\tA.\tB.\t7.5",  # outside 0..5
        "5\tfff\tA.\tB.\t1.0\textra",  # one field too many
        "6\tggg\t   \tB.\t1.0",  # blank sentence
        "7\thhh\tA dog.\tA cat.\t0.0",
    ])
    with pytest.warns(UserWarning, match=r"sts\.csv: skipped 6 malformed row\(s\) \(first at line 3") as caught:
        loaded = load_task_file("sts", path)
    assert len(caught) == 1
    assert [(e.id, e.label) for e in loaded.examples] == [("aaa", 4.2), ("hhh", 0.0)]
    assert loaded.skipped == 6


def test_sentiment_and_duplicate_label_ranges(tmp_path):
    sst = _write(tmp_path / "sst.csv", ["\tid\tsentence\tsentiment", "0\ta\tGood .\t4", "1\tb\tBad .\t5",
                                        "2\tc\tMeh .\t2.5"])
    with pytest.warns(UserWarning):
        assert [e.label for e in load_task_file("sst", sst).examples] == [4]
    para = _write(tmp_path / "para.csv", ["\tid\tsentence1\tsentence2\tis_duplicate", "0\ta\tx\ty\t1.0",
                                          "1\tb\tx\ty\t0.5", "2\tc\tx\ty\t0"])
    with pytest.warns(UserWarning):
        assert [e.label for e in load_task_file("para", para).examples] == [1.0, 0.0]


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="quora-train.csv"):
        load_task_file("para", tmp_path / "quora-train.csv")


def test_missing_column_names_file_and_column(tmp_path):
    path = _write(tmp_path / "weird.csv", ["\tid\tsentence1\tsimilarity", "0\ta\tx\t1.0"])
    with pytest.raises(ValueError, match=r"weird\.csv.*'sentence2'"):
        load_task_file("sts", path)
    # A labeled load of an unlabeled file is a missing column too.
    test = _write(tmp_path / "test.csv", ["\tid\tsentence", "0\ta\tx"])
    with pytest.raises(ValueError, match="sentiment"):
        load_task_file("sst", test, labeled=True)
    assert load_task_file("sst", test).examples == [Example("a", ("x",), None)]


def test_synthetic_set_round_trips(tmp_path):
    write_synthetic_data(tmp_path, n_train=30, n_dev=10, n_test=5)
    for (task, split), name in DEFAULT_FILES.items():
        loaded = load_task_file(task, tmp_path / name)
        assert (len(loaded), loaded.skipped, loaded.labeled) == ({"train": 30, "dev": 10, "test": 5}[split], 0,
                                                                 split != "test")


# -- batching ------------------------------------------------------------------------------------

def _padding_by_hand(lengths, batches):
    pad = real = 0
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        pad += sum(longest - lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
    return pad / (pad + real)


@pytest.mark.parametrize("n,batch_size", [(1, 4), (7, 3), (1000, 32), (257, 16)])
def test_bucket_sampler_covers_every_index_once(n, batch_size):
    lengths = torch.randint(1, 60, (n,)).tolist()
    sampler = LengthBucketSampler(lengths, batch_size, seed=3, pool_batches=4)
    batches = sampler.batches(epoch=0)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert batches == LengthBucketSampler(lengths, batch_size, seed=3, pool_batches=4).batches(epoch=0)
    if n > batch_size:
        assert batches != sampler.batches(epoch=1)


@pytest.mark.parametrize("size,world_size", [(16, 2), (16, 3), (8, 3), (2, 3), (1, 1)])
def test_rank_shares_split_a_batch_disjointly_and_evenly(size, world_size):
    batch = [100 + i for i in range(size)]
    shares = [rank_share(batch, rank, world_size) for rank in range(world_size)]
    assert sorted(i for share in shares for i in share) == batch
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        rank_share(batch, 2, 2)


def test_bucketing_reduces_padding_and_reports_it():
    lengths = torch.randint(5, 120, (2000,)).tolist()
    bucketed = LengthBucketSampler(lengths, 32, seed=0)
    plain = LengthBucketSampler(lengths, 32, seed=0, bucket=False)
    fraction_bucketed = bucketed.padding_fraction(bucketed.batches(0))
    fraction_plain = plain.padding_fraction(plain.batches(0))
    assert fraction_bucketed == pytest.approx(_padding_by_hand(lengths, bucketed.batches(0)))
    assert fraction_plain == pytest.approx(_padding_by_hand(lengths, plain.batches(0)))
    assert fraction_bucketed < 0.1 < fraction_plain


def test_unshuffled_sampler_keeps_file_order():
    sampler = LengthBucketSampler([3, 1, 2, 5, 4], 2, shuffle=False, bucket=False)
    assert sampler.batches() == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler([1], 0)


def test_collate_pairs_separate_and_joint(tokenizer):
    examples = [Example("a", ("A man plays guitar.", "Someone plays music."), 3.2),
                Example("b", ("Hi.", "A much longer second sentence with many words."), 0.4)]
    separate = collate(examples, tokenizer, "separate")
    assert separate["inputs"]["input_ids"].shape[0] == 4  # first sentences, then second sentences
    expected = tokenizer(["A man plays guitar.", "Hi.", "Someone plays music.",
                          "A much longer second sentence with many words."])
    torch.testing.assert_close(separate["inputs"]["input_ids"], expected["input_ids"])
    assert separate["labels"].dtype == torch.float32 and separate["labels"].tolist() == pytest.approx([3.2, 0.4])
    joint = collate(examples, tokenizer, "joint", max_length=12)
    assert joint["inputs"]["input_ids"].shape == (2, 12)
    assert joint["inputs"]["token_type_ids"][0].max() == 1  # the second sentence has type id 1
    assert joint["ids"] == ["a", "b"]
    sst = collate([Example("c", ("Great .",), 4)], tokenizer)
    assert sst["labels"].dtype == torch.long and sst["inputs"]["input_ids"].shape[0] == 1
    assert collate([Example("d", ("x",), None)], tokenizer)["labels"] is None


def test_example_lengths_count_tokens(tokenizer):
    examples = [Example("a", ("hello world",), 0), Example("b", ("a b c d e f",), 1)]
    assert example_lengths(examples, tokenizer) == [4, 8]  # with [CLS] and [SEP]
    pairs = [Example("a", ("hello world", "a b c"), 0.0)]
    assert example_lengths(pairs, tokenizer, pair_mode="separate") == [5]
    assert example_lengths(pairs, tokenizer, pair_mode="joint") == [8]


def test_download_fetches_and_checks_every_file(tmp_path, capsys):
    """The download itself needs internet; a file:// mirror exercises the same code path."""
    from mtbert.data import main

    mirror = write_synthetic_data(tmp_path / "mirror", n_train=12, n_dev=6, n_test=4)
    assert main(["download", "--to", str(tmp_path / "got"), "--base-url", mirror.resolve().as_uri()]) == 0
    assert "9 files" in capsys.readouterr().out
    for name in DEFAULT_FILES.values():
        assert (tmp_path / "got" / name).read_bytes() == (mirror / name).read_bytes()
    (mirror / "sts-dev.csv").write_text("\tid\tsentence1\n", encoding="utf-8")  # a broken file is caught
    assert main(["download", "--to", str(tmp_path / "again"), "--base-url", mirror.resolve().as_uri()]) == 2
    assert "sts-dev.csv is not a STS-B similarity file" in capsys.readouterr().err
    assert main(["download", "--to", str(tmp_path / "none"), "--base-url",
                 (tmp_path / "missing").resolve().as_uri()]) == 2
    assert "could not download" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "got")]) == 0
