"""The CS224N multitask data: loaders for the tab-separated files, length-bucketed batching,
collation into encoder inputs, a synthetic sanity set, and the download of the official files.

File format (the CS224N default final project): a header line, tab-separated columns, the first
one unnamed (the row number in the original release), then ``id`` and the task's columns:

========== ============================== ========================================
task       columns                        label
========== ============================== ========================================
``sst``    id, sentence, sentiment        int 0..4 (SST-5)
``para``   id, sentence1, sentence2,      0.0 / 1.0 (Quora ``is_duplicate``)
           is_duplicate
``sts``    id, sentence1, sentence2,      float 0..5 (STS-B ``similarity``)
           similarity
========== ============================== ========================================

The ``*-test-student.csv`` files have no label column. Files are read with :mod:`csv` exactly as
the starter code reads them (``csv.DictReader(delimiter='\\t')``), so quoting behaves the same.
"""
import csv
import io
import logging
import math
import random
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataFileError, DownloadError, MissingFileError, make_directory

logger = logging.getLogger(__name__)

TASKS = ("sst", "para", "sts")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple
    label_column: str
    description: str

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


TASK_SPECS = {
    "sst": TaskSpec("sst", ("sentence",), "sentiment", "SST-5 sentiment"),
    "para": TaskSpec("para", ("sentence1", "sentence2"), "is_duplicate", "Quora paraphrase"),
    "sts": TaskSpec("sts", ("sentence1", "sentence2"), "similarity", "STS-B similarity"),
}


def _parse_sentiment(text):
    value = int(text)  # the starter's int(); "3.0" is malformed
    if not 0 <= value <= 4:
        raise ValueError(f"sentiment {value} outside 0..4")
    return value


def _parse_duplicate(text):
    value = float(text)
    if value not in (0.0, 1.0):
        raise ValueError(f"is_duplicate {value} is neither 0 nor 1")
    return value


def _parse_similarity(text):
    value = float(text)
    if not 0.0 <= value <= 5.0:  # also rejects NaN
        raise ValueError(f"similarity {value} outside 0..5")
    return value


_LABEL_PARSERS = {"sst": _parse_sentiment, "para": _parse_duplicate, "sts": _parse_similarity}


@dataclass(frozen=True)
class Example:
    """One row: its ``id``, one or two ``texts``, and the ``label`` (None in test files)."""
    id: str
    texts: tuple
    label: object = None


@dataclass
class TaskFile:
    """The examples read from one file, and how many rows were skipped as malformed."""
    task: str
    path: Path
    examples: list
    skipped: int
    labeled: bool

    def __len__(self):
        return len(self.examples)


def load_task_file(task, path, labeled=None) -> TaskFile:
    """Reads one CS224N file of ``task`` (``sst``, ``para`` or ``sts``).

    ``labeled``: True requires the label column, False ignores it, None (default) uses it when the
    header has it. Malformed rows (a missing or empty field, a label that does not parse or lies
    outside its range — the real files have rows whose quoting swallowed the tab separators) are
    skipped and counted in one warning per file. A missing file or column raises an error naming it.
    """
    if task not in TASK_SPECS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    spec = TASK_SPECS[task]
    path = Path(path)
    reader = csv.DictReader(io.StringIO(_read_text(task, path), newline=""), delimiter="\t")
    header = reader.fieldnames or []
    if not header:
        raise DataFileError(f"{path} is empty: a {spec.description} file starts with a header line "
                            f"naming its columns {['id', *spec.text_columns, spec.label_column]}")
    has_label = spec.label_column in header
    if labeled is None:
        labeled = has_label
    required = ("id", *spec.text_columns) + ((spec.label_column,) if labeled else ())
    missing = [c for c in required if c not in header]
    if missing:
        raise DataFileError(
            f"{path} is not a {spec.description} file: missing column(s) {missing}; "
            f"its header has {[c for c in header if c]}"
        )
    examples, skipped, first_problem = [], 0, None
    try:
        for row in reader:
            try:
                example = _parse_row(row, spec, labeled)
            except ValueError as err:
                skipped += 1
                if first_problem is None:
                    first_problem = f"line {reader.line_num}: {err}"
                continue
            examples.append(example)
    except csv.Error as err:  # e.g. a field over csv's size limit: an unclosed quote swallowed the file
        raise DataFileError(f"{path}, line {reader.line_num}: not readable as tab-separated values ({err})") from err
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed row(s) (first at {first_problem})", stacklevel=2)
    return TaskFile(task, path, examples, skipped, labeled)


def _read_text(task, path) -> str:
    """The whole file as text, or an error naming the file and the line of the first bad byte."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise MissingFileError(f"{task} data file {path} {what} (get the CS224N files with "
                               "`python -m mtbert.data download --to DIR`)")
    data = path.read_bytes()
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise DataFileError(f"{path} is a binary file, not tab-separated text (a NUL byte on line {line})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataFileError(f"{path}, line {line}: byte 0x{data[err.start]:02x} is not UTF-8; the CS224N files "
                            "are UTF-8 text (re-save the file as UTF-8)") from None


def _parse_row(row, spec, labeled):
    if None in row:  # more fields than the header: a tab inside an unquoted field
        raise ValueError(f"{len(row[None])} field(s) more than the header")
    values = {}
    for column in ("id", *spec.text_columns) + ((spec.label_column,) if labeled else ()):
        value = row.get(column)
        if value is None or not value.strip():
            raise ValueError(f"empty or missing {column!r}")
        values[column] = value.strip()
    label = _LABEL_PARSERS[spec.name](values[spec.label_column]) if labeled else None
    return Example(values["id"], tuple(values[c] for c in spec.text_columns), label)


# The CS224N starter's default paths, relative to the data directory.
DEFAULT_FILES = {
    ("sst", "train"): "ids-sst-train.csv",
    ("sst", "dev"): "ids-sst-dev.csv",
    ("sst", "test"): "ids-sst-test-student.csv",
    ("para", "train"): "quora-train.csv",
    ("para", "dev"): "quora-dev.csv",
    ("para", "test"): "quora-test-student.csv",
    ("sts", "train"): "sts-train.csv",
    ("sts", "dev"): "sts-dev.csv",
    ("sts", "test"): "sts-test-student.csv",
}


def split_validation(examples, fraction, seed, name=""):
    """Splits training ``examples`` into (train, validation): a seeded random ``fraction`` of them
    (rounded, at least one when ``fraction`` > 0) held out for choosing epochs, checkpoints and
    settings, so that the dev set is scored once, for the final model. Both parts keep the file's
    order; the draw depends only on ``(seed, name, len(examples))``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(examples), []
    size = max(1, round(fraction * len(examples)))
    if size >= len(examples):
        raise ValueError(f"{name or 'the training file'} has {len(examples)} example(s): too few to hold out "
                         f"a validation fraction of {fraction} and still train")
    held_out = set(random.Random(f"{seed}-validation-{name}").sample(range(len(examples)), size))
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


# -- batching -------------------------------------------------------------------------------------

def example_lengths(examples, tokenizer, max_length=None, pair_mode="separate"):
    """Token count of each example, the quantity bucketing sorts on: the sentence's length, or for
    pairs the longer sentence (``pair_mode='separate'``, encoded one by one) or the joint
    ``[CLS] a [SEP] b [SEP]`` length (``'joint'``). Counts include the special tokens."""
    lengths = []
    chunk = 512
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        if len(part[0].texts) == 1:
            lengths += _token_counts(tokenizer, [e.texts[0] for e in part], None, max_length)
        elif pair_mode == "joint":
            lengths += _token_counts(tokenizer, [e.texts[0] for e in part], [e.texts[1] for e in part], max_length)
        else:
            first = _token_counts(tokenizer, [e.texts[0] for e in part], None, max_length)
            second = _token_counts(tokenizer, [e.texts[1] for e in part], None, max_length)
            lengths += [max(a, b) for a, b in zip(first, second)]
    return lengths


def _token_counts(tokenizer, texts, pairs, max_length):
    return tokenizer(texts, pairs, max_length=max_length)["attention_mask"].sum(dim=1).tolist()


class LengthBucketSampler:
    """Batches of indices for one epoch: shuffled, then grouped so that a batch holds examples of
    similar length (little padding), the batch order shuffled again.

    The examples are shuffled, cut into pools of ``pool_batches`` batches, each pool sorted by
    length and cut into batches (the usual "sortish" sampler, as in fairseq and AllenNLP's bucket
    iterator). ``bucket=False`` gives plain shuffled batches; ``shuffle=False`` keeps file order
    (evaluation). An epoch's batches are a pure function of ``(seed, epoch)``, so resuming
    regenerates them and skips the batches already done.
    """

    def __init__(self, lengths, batch_size, shuffle=True, bucket=True, seed=0, pool_batches=50, drop_last=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(lengths) == 0:
            raise ValueError("LengthBucketSampler needs at least one example")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.bucket = bucket
        self.seed = seed
        self.pool_batches = pool_batches
        self.drop_last = drop_last and len(self.lengths) >= batch_size

    def __len__(self):
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch=0) -> list:
        """The list of batches (lists of example indices) of ``epoch``."""
        order = list(range(len(self.lengths)))
        rng = random.Random(f"{self.seed}-{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        if self.bucket:
            pool = self.batch_size * self.pool_batches
            order = [i for start in range(0, len(order), pool)
                     for i in sorted(order[start:start + pool], key=self.lengths.__getitem__)]
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.bucket:
            rng.shuffle(batches)  # otherwise each pool would run short to long
        return batches

    def padding_fraction(self, batches) -> float:
        """Fraction of the token slots of ``batches`` (each padded to its longest) that are padding."""
        padded = sum(len(b) * max(self.lengths[i] for i in b) for b in batches)
        real = sum(self.lengths[i] for b in batches for i in b)
        return 1.0 - real / padded if padded else 0.0


def rank_share(batch, rank, world_size) -> list:
    """Rank ``rank``'s disjoint share of one global batch (a list of example indices) when
    ``world_size`` processes train on it together: every ``world_size``-th index from position
    ``rank``. The shares cover the batch and differ in size by at most one; a length-bucketed batch
    is sorted by length, so each share holds sequences of every length of the batch (each rank's
    forward pass costs about the same). The batch itself is the same on every rank (a seeded
    :class:`LengthBucketSampler`), so the global batches do not depend on ``world_size``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return list(batch[rank::world_size])


def collate(examples, tokenizer, pair_mode="separate", max_length=None) -> dict:
    """Encoder inputs for a batch of one task.

    Returns ``{"inputs": tokenized, "labels": tensor or None, "ids": [str]}``; ``inputs`` is one
    tokenizer output ([rows, L] tensors) for a single encoder pass: the sentences; for pairs in
    ``pair_mode='separate'`` the B first sentences then the B second ones (one pass over 2B rows
    is faster than two passes of B); for ``'joint'`` the B pairs as ``[CLS] a [SEP] b [SEP]``.
    Labels are int64 for SST, float32 for the pair tasks.
    """
    if pair_mode not in ("separate", "joint"):
        raise ValueError(f"pair_mode must be 'separate' or 'joint', got {pair_mode!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    width = len(examples[0].texts)
    if width == 1:
        inputs = tokenizer([e.texts[0] for e in examples], max_length=max_length)
    elif pair_mode == "joint":
        inputs = tokenizer([e.texts[0] for e in examples], [e.texts[1] for e in examples], max_length=max_length)
    else:
        inputs = tokenizer([e.texts[0] for e in examples] + [e.texts[1] for e in examples], max_length=max_length)
    labels = None
    if examples[0].label is not None:
        dtype = torch.long if width == 1 else torch.float32
        labels = torch.tensor([e.label for e in examples], dtype=dtype)
    return {"inputs": inputs, "labels": labels, "ids": [e.id for e in examples]}


def concat_inputs(batches, pad_token_id=0):
    """Several tokenizer outputs ([rows, L_i] tensors with the same keys) as one: their rows one
    after the other, right-padded to the longest L_i (``pad_token_id``, mask 0, token type 0).
    Returns (inputs, offsets): batch i is rows ``offsets[i]:offsets[i + 1]``."""
    if not batches:
        raise ValueError("concat_inputs needs at least one batch")
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_token_id}
    inputs = {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=fill.get(key, 0)) for b in batches])
              for key in batches[0]}
    offsets = [0]
    for b in batches:
        offsets.append(offsets[-1] + b["input_ids"].shape[0])
    return inputs, offsets


# -- synthetic sanity data ------------------------------------------------------------------------

_SENTIMENT_WORDS = (("awful", "dreadful", "terrible"), ("dull", "weak", "tedious"), ("uneven", "average", "passable"),
                    ("good", "pleasant", "solid"), ("brilliant", "superb", "wonderful"))
_NOUNS = ("film", "movie", "story", "cast", "script", "plot", "score", "ending", "director", "scene",
          "dog", "city", "river", "phone", "garden", "train", "market", "doctor", "teacher", "song")
_VERBS = ("likes", "visits", "paints", "watches", "builds", "sells", "finds", "cleans", "follows", "reads")


def write_synthetic_data(directory, n_train=400, n_dev=100, n_test=100, seed=0) -> Path:
    """Writes a small, learnable data set in the CS224N format (all nine files) into ``directory``.

    Labels follow simple rules a small model can learn: the SST label is the sentiment word used;
    a Quora pair is a duplicate when both sentences name the same subject and object; the STS
    score is 5 × the fraction of the three content words the sentences share. It exercises every
    stage of the pipeline; its scores mean nothing about the real tasks.
    """
    directory = make_directory(Path(directory), "data directory")
    rng = random.Random(seed)

    def sentence_pair(same_words):
        words = [rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS)]
        other = list(words)
        for k in rng.sample(range(3), 3 - same_words):
            pool = (_VERBS if k == 1 else _NOUNS)
            other[k] = rng.choice([w for w in pool if w != words[k]])
        return f"the {words[0]} {words[1]} the {words[2]} .", f"a {other[0]} {other[1]} a {other[2]} ."

    def hex_id():
        return "".join(rng.choice("0123456789abcdef") for _ in range(25))

    def write(name, header, rows):
        with open(directory / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["", "id", *header])
            for i, row in enumerate(rows):
                writer.writerow([i, hex_id(), *row])

    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        labeled = split != "test"
        sst_rows = []
        for _ in range(n):
            label = rng.randrange(5)
            text = f"the {rng.choice(_NOUNS)} is {rng.choice(_SENTIMENT_WORDS[label])} and {rng.choice(_NOUNS)} ."
            sst_rows.append([text] + ([label] if labeled else []))
        para_rows, sts_rows = [], []
        for _ in range(n):
            duplicate = rng.random() < 0.4
            a, b = sentence_pair(3 if duplicate else rng.choice((0, 1, 2)))
            para_rows.append([a, b] + ([f"{float(duplicate)}"] if labeled else []))
            shared = rng.randrange(4)
            a, b = sentence_pair(shared)
            sts_rows.append([a, b] + ([f"{5.0 * shared / 3:.1f}"] if labeled else []))
        sst_header = ["sentence"] + (["sentiment"] if labeled else [])
        pair_header = ["sentence1", "sentence2"]
        write(DEFAULT_FILES[("sst", split)], sst_header, sst_rows)
        write(DEFAULT_FILES[("para", split)], pair_header + (["is_duplicate"] if labeled else []), para_rows)
        write(DEFAULT_FILES[("sts", split)], pair_header + (["similarity"] if labeled else []), sts_rows)
    return directory


# -- download -------------------------------------------------------------------------------------

OFFICIAL_BASE_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data"


def download(to, base_url=OFFICIAL_BASE_URL, overwrite=False) -> dict:
    """Fetches the nine CS224N files from ``base_url`` into ``to`` and checks each one loads
    (right columns, how many malformed rows). Returns ``{filename: rows}``."""
    to = make_directory(Path(to), "data directory")
    rows = {}
    for (task, split), name in DEFAULT_FILES.items():
        target = to / name
        if overwrite or not target.is_file():
            url = f"{base_url.rstrip('/')}/{name}"
            logger.info("downloading %s", url)
            partial = target.with_suffix(target.suffix + ".part")
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                    out.write(response.read())
            except OSError as err:
                partial.unlink(missing_ok=True)
                raise DownloadError(f"could not download {url}: {err}") from err
            partial.replace(target)
        loaded = load_task_file(task, target, labeled=split != "test")
        if not loaded.examples:
            raise DownloadError(f"{target} holds no usable rows; delete it and download again")
        rows[name] = len(loaded)
        logger.info("%s: %d rows, %d malformed rows skipped", name, len(loaded), loaded.skipped)
    return rows
