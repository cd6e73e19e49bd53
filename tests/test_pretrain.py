"""Continued masked-LM pre-training (python -m mtbert.pretrain): it reads the training files only
(dev and test files made unreadable change nothing) and leaves the validation split out, BERT's
masking, a few steps lower the MLM loss of a tiny model, and the output directory is one that
--model accepts."""
import shutil

import pytest
import torch

from mtbert import BertModel
from mtbert.data import DEFAULT_FILES
from mtbert.multitask import data as data_module
from mtbert.multitask.mlm import IGNORE_INDEX, MaskedLMTrainer, mask_tokens, training_sentences
from mtbert.multitask.model import MultitaskBert
from mtbert.multitask.trainer import TrainConfig, load_training_split
from mtbert.pretrain import main
from mtbert.tokenizer import Tokenizer


@pytest.fixture
def train_only_data(toy_data, tmp_path, monkeypatch):
    """A copy of the toy data whose dev and test files are not text, and a list of every file read."""
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    for (task, split), name in DEFAULT_FILES.items():
        if split != "train" and (data / name).exists():
            (data / name).write_bytes(b"\xff\xfe not a CSV \x00")
    read, real = [], data_module._read_text
    monkeypatch.setattr(data_module, "_read_text", lambda task, path: read.append(path.name) or real(task, path))
    return data, read


def test_sentences_come_from_the_training_rows_less_the_validation_split(train_only_data):
    data, read = train_only_data
    sentences = training_sentences(data, val_fraction=0.25, val_seed=3)
    assert sorted(read) == sorted(name for (task, split), name in DEFAULT_FILES.items() if split == "train")
    config = TrainConfig(data=str(data), val_fraction=0.25, val_seed=3)
    kept, held_out = set(), set()
    for task in config.tasks:
        train, val = load_training_split(config, task)
        kept.update(t for e in train.examples for t in e.texts)
        held_out.update(t for e in val.examples for t in e.texts)
    assert set(sentences) == kept and len(sentences) == len(kept)  # distinct
    assert held_out - kept and not (held_out - kept) & set(sentences)


def test_masking_follows_bert():
    ids = torch.randint(5, 1000, (200, 50))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -5:] = True
    inputs, labels = mask_tokens(ids, special, mask_token_id=3, vocab_size=1000,
                                 generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    assert not chosen[special].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    n = int(chosen.sum())
    assert abs(n / (~special).sum().item() - 0.15) < 0.01  # 8,800 candidates: sd 0.004
    masked = int((inputs[chosen] == 3).sum())
    kept = int((inputs[chosen] == ids[chosen]).sum())
    assert abs(masked / n - 0.8) < 0.03 and abs(kept / n - 0.1) < 0.03


def test_a_few_steps_lower_the_mlm_loss(tiny_model_dir, toy_data):
    sentences = training_sentences(toy_data)
    trainer = MaskedLMTrainer(tiny_model_dir, sentences, batch_size=16, lr=2e-3, max_length=32, seed=1)
    assert trainer.head.word_embeddings.weight is trainer.encoder.embeddings.word_embeddings.weight  # tied

    def held_loss():  # one fixed masked batch, dropout off
        trainer.encoder.eval()
        with torch.no_grad():
            loss = trainer.loss(*trainer.batch(sentences[:64], torch.Generator().manual_seed(0))).item()
        trainer.encoder.train()
        return loss

    before = held_loss()
    result = trainer.fit(steps=15, progress=False)
    assert result["steps"] == 15 and result["wall_s"] > 0
    assert held_loss() < before - 1.0  # about ln(30522) = 10.3 at the start


def test_command_writes_a_directory_that_model_accepts(tiny_model_dir, train_only_data, tmp_path, capsys):
    data, read = train_only_data
    out = tmp_path / "mlm"
    assert main(["--data", str(data), "--out", str(out), "--model", str(tiny_model_dir), "--steps", "2",
                 "--batch-size", "4", "--max-length", "16", "--no-progress"]) == 0
    assert all("train" in name for name in read)
    assert "masked-LM pre-training: 2 steps in" in capsys.readouterr().out
    encoder = BertModel.from_pretrained(out)
    original = BertModel.from_pretrained(tiny_model_dir)
    assert not torch.equal(encoder.embeddings.word_embeddings.weight, original.embeddings.word_embeddings.weight)
    assert Tokenizer.from_pretrained(out).vocab_size == Tokenizer.from_pretrained(tiny_model_dir).vocab_size
    MultitaskBert.from_pretrained(out)  # what mtbert-train --model OUT builds
    assert main(["--data", str(data), "--out", str(out)]) == 2  # neither --steps nor --minutes
