"""Continued masked-language-model pre-training of the encoder on the task sentences (issue 15):
BERT's MLM objective (Devlin et al. 2019, §3.1) on the sentences of the training files only, never
dev or test text, and without the validation split that mtbert-train holds out of the same files
(same --val-fraction and --val-seed), so that choosing checkpoints on it stays honest. The result
is a ``save_pretrained`` directory that ``mtbert-train --model DIR`` fine-tunes.

all-MiniLM-L6-v2 ships without an MLM head, so the head's transform (Linear, GELU, LayerNorm) is
initialised freshly; its decoder is tied to the word embeddings, as in BERT."""
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import make_directory
from ..model import BertModel
from ..pretrained import resolve_model_dir
from ..tokenizer import Tokenizer
from .data import TASKS
from .predictor import copy_tokenizer_files
from .trainer import TrainConfig, load_training_split

logger = logging.getLogger(__name__)

MASK_PROBABILITY = 0.15
IGNORE_INDEX = -100  # F.cross_entropy's default: positions that are not predicted


class MaskedLMHead(nn.Module):
    """BERT's MLM head: hidden states [..., H] → transform (Linear, GELU, LayerNorm) → logits
    [..., V] through the word-embedding matrix (tied) plus a bias."""

    def __init__(self, word_embeddings: nn.Embedding, layer_norm_eps=1e-12):
        super().__init__()
        hidden = word_embeddings.embedding_dim
        self.dense = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.word_embeddings = word_embeddings  # shared with the encoder, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden):
        return self.layer_norm(F.gelu(self.dense(hidden))) @ self.word_embeddings.weight.T + self.bias


def training_sentences(data, val_fraction=0.1, val_seed=11711, tasks=TASKS) -> list:
    """The distinct sentences of the rows mtbert-train trains on with these settings: the training
    files (``DATA/<the CS224N starter's names>``) less the validation split; in file order."""
    config = TrainConfig(data=str(data), tasks=tuple(tasks), val_fraction=val_fraction, val_seed=val_seed,
                         select_on="val" if val_fraction else "dev")
    sentences = {}
    for task in config.tasks:
        train, _ = load_training_split(config, task)
        for example in train.examples:
            sentences.update(dict.fromkeys(example.texts))
    return list(sentences)


def mask_tokens(input_ids, special, mask_token_id, vocab_size, generator, probability=MASK_PROBABILITY):
    """BERT's masking: each token that is not ``special`` ([B, L] bool: [CLS], [SEP], padding) is
    chosen with ``probability``; a chosen token becomes [MASK] (80%), a random token (10%) or stays
    (10%). Returns (inputs, labels): labels hold the original ids at the chosen positions and
    IGNORE_INDEX elsewhere."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    draw = torch.rand(input_ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), mask_token_id, input_ids)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    return inputs, labels


class MaskedLMTrainer:
    """Continued MLM pre-training of ``model`` (a checkpoint name or directory) on ``sentences``."""

    def __init__(self, model, sentences, batch_size=32, lr=5e-5, max_length=128, seed=11711,
                 mask_probability=MASK_PROBABILITY):
        if not sentences:
            raise ValueError("sentences must hold at least one sentence")
        torch.manual_seed(seed)
        self.model_dir = resolve_model_dir(model)
        self.tokenizer = Tokenizer.from_pretrained(model)
        self.mask_token_id = self.tokenizer.token_to_id("[MASK]")
        if self.mask_token_id is None:
            raise ValueError(f"the vocabulary of {model} has no [MASK] token")
        self.encoder = BertModel.from_pretrained(model).train()
        self.head = MaskedLMHead(self.encoder.embeddings.word_embeddings, self.encoder.config.layer_norm_eps)
        parameters = list({id(p): p for p in [*self.encoder.parameters(), *self.head.parameters()]}.values())
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
        self.sentences, self.batch_size, self.max_length = list(sentences), batch_size, max_length
        self.mask_probability = mask_probability
        self.generator = torch.Generator().manual_seed(seed)
        self.order_rng = random.Random(f"{seed}-mlm")
        self.order, self.position, self.steps = [], 0, 0

    def batch(self, sentences, generator):
        """(masked inputs, labels) of ``sentences`` with a fresh draw of the masks."""
        inputs = self.tokenizer(sentences, max_length=self.max_length)
        ids = inputs["input_ids"]
        special = (ids == self.tokenizer.cls_token_id) | (ids == self.tokenizer.sep_token_id) | (
            inputs["attention_mask"] == 0)
        masked, labels = mask_tokens(ids, special, self.mask_token_id, self.encoder.config.vocab_size, generator,
                                     self.mask_probability)
        return {**inputs, "input_ids": masked}, labels

    def loss(self, inputs, labels):
        """Mean cross-entropy of the predicted tokens (NaN-free: 0 when none is chosen)."""
        hidden = self.encoder(**inputs).last_hidden_state
        chosen = labels != IGNORE_INDEX
        if not chosen.any():
            return hidden.sum() * 0.0
        return F.cross_entropy(self.head(hidden[chosen]), labels[chosen])

    def _next_sentences(self):
        if self.position >= len(self.order):  # a new pass, a new shuffle
            self.order = list(range(len(self.sentences)))
            self.order_rng.shuffle(self.order)
            self.position = 0
        indices = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.sentences[i] for i in indices]

    def step(self) -> float:
        inputs, labels = self.batch(self._next_sentences(), self.generator)
        loss = self.loss(inputs, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.item()

    def fit(self, steps=None, minutes=None, progress=True) -> dict:
        """Trains until ``steps`` optimizer steps or ``minutes`` of wall time, whichever comes first
        (at least one must be given). Returns {"steps", "wall_s", "first_loss", "last_loss"}."""
        if steps is None and minutes is None:
            raise ValueError("give steps or minutes (or both)")
        started = time.perf_counter()
        deadline = math.inf if minutes is None else started + 60 * minutes
        limit = math.inf if steps is None else steps
        losses = []
        bar = tqdm(total=steps, desc="masked-LM", disable=not progress, dynamic_ncols=True)
        while self.steps < limit and time.perf_counter() < deadline:
            losses.append(self.step())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        bar.close()
        window = max(1, min(50, len(losses) // 4))
        return {"steps": self.steps, "wall_s": time.perf_counter() - started,
                "first_loss": sum(losses[:window]) / window if losses else math.nan,
                "last_loss": sum(losses[-window:]) / window if losses else math.nan}

    def save(self, directory) -> Path:
        """The encoder with ``save_pretrained`` and the tokenizer's files: ``--model DIR``."""
        directory = make_directory(Path(directory), "output directory")
        self.encoder.save_pretrained(directory)
        copy_tokenizer_files(self.model_dir, directory)
        return directory
