"""MultitaskBert: one shared BERT encoder, a sentiment head and two sentence-pair heads."""
import torch.nn as nn

from ..encode import POOLINGS, pool
from ..model import BertModel
from ..pretrained import DEFAULT_MODEL
from . import losses
from .heads import PAIR_HEADS, SentimentHead, make_pair_head

# A cosine head's initial affine map, chosen so that cosines of sentence embeddings (which fall
# in [0, 1]) start out spread over the target's range; None keeps the bare cosine.
_COSINE_AFFINE = {
    ("para", None): (10.0, -5.0),  # logit 10·cos − 5: cos 0.5 is even odds
    ("sts", "mse"): (5.0, 0.0),  # similarity 5·cos
    ("sts", "ce"): (10.0, -5.0),  # similarity 5·σ(10·cos − 5)
    ("sts", "cosine-mse"): None,
    ("sts", "cosent"): None,
}


class MultitaskBert(nn.Module):
    """A shared encoder with three heads: ``sst`` (5 classes), ``para`` (paraphrase logit) and
    ``sts`` (similarity score).

    ``forward(task, inputs)`` takes one tokenizer output as built by
    :func:`mtbert.multitask.data.collate` with ``pair_mode=model.pair_mode(task)`` and returns
    the head's scores: [B, 5] logits for ``sst``, [B] for the pair tasks. ``loss`` and ``predict``
    turn scores into the task's loss and its predictions (class, 0/1, similarity 0–5).
    """

    def __init__(self, encoder: BertModel, pooling="mean", para_head="sbert", sts_head="sbert", sts_loss="mse",
                 dropout=None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        for name, head in (("para_head", para_head), ("sts_head", sts_head)):
            if head not in PAIR_HEADS:
                raise ValueError(f"{name} must be one of {PAIR_HEADS}, got {head!r}")
        if sts_loss not in losses.STS_LOSSES:
            raise ValueError(f"sts_loss must be one of {losses.STS_LOSSES}, got {sts_loss!r}")
        hidden = encoder.config.hidden_size
        dropout = encoder.config.hidden_dropout_prob if dropout is None else dropout
        self.encoder = encoder
        self.pooling = pooling
        self.sts_loss = sts_loss
        self.head_config = {"pooling": pooling, "para_head": para_head, "sts_head": sts_head, "sts_loss": sts_loss,
                            "dropout": dropout}
        self.heads = nn.ModuleDict({
            "sst": SentimentHead(hidden, dropout),
            "para": make_pair_head(para_head, hidden, dropout, _COSINE_AFFINE[("para", None)]),
            "sts": make_pair_head(sts_head, hidden, dropout, _COSINE_AFFINE[("sts", sts_loss)]),
        })

    @classmethod
    def from_pretrained(cls, name_or_path=DEFAULT_MODEL, hidden_dropout_prob=None, **head_options):
        """The encoder from a checkpoint (see ``BertModel.from_pretrained``), fresh heads."""
        overrides = {} if hidden_dropout_prob is None else {"hidden_dropout_prob": hidden_dropout_prob}
        return cls(BertModel.from_pretrained(name_or_path, **overrides), **head_options)

    def pair_mode(self, task) -> str:
        """How ``collate`` must encode this task's examples: ``'joint'`` for the cross head."""
        return "joint" if getattr(self.heads[task], "joint", False) else "separate"

    def embed(self, inputs):
        """Pooled sentence vectors [N, H] of one tokenizer output (``mtbert.encode.POOLINGS``)."""
        return pool(self.encoder(**inputs), inputs["attention_mask"], self.pooling)

    def forward(self, task, inputs):
        return self.head_scores(task, self.embed(inputs))

    def forward_packed(self, tasks, inputs, offsets):
        """The scores of several batches from one encoder pass: ``inputs`` holds the batches'
        rows one after the other (see :func:`mtbert.multitask.data.concat_inputs`), batch i being
        rows ``offsets[i]:offsets[i + 1]``, of task ``tasks[i]``. Returns one score tensor per batch."""
        if len(offsets) != len(tasks) + 1:
            raise ValueError(f"offsets must have one more entry than tasks ({len(tasks)}), got {len(offsets)}")
        pooled = self.embed(inputs)
        return [self.head_scores(task, pooled[begin:end]) for task, begin, end in zip(tasks, offsets, offsets[1:])]

    def head_scores(self, task, pooled):
        """The head of ``task`` on the pooled rows of one of its batches."""
        head = self.heads[task]
        if task == "sst" or head.joint:
            return head(pooled)
        u, v = pooled.chunk(2, dim=0)  # collate put the first sentences first
        return head(u, v)

    def loss(self, task, scores, labels):
        if task == "sst":
            return losses.sst_loss(scores, labels)
        if task == "para":
            return losses.para_loss(scores, labels)
        return losses.sts_loss(self.sts_loss, scores, labels)

    def predict(self, task, scores):
        """SST: the class 0–4; para: 1.0 / 0.0 (σ(logit) rounded, as the starter does); STS: the
        similarity 0–5 the score stands for under the STS loss."""
        if task == "sst":
            return scores.argmax(dim=-1)
        if task == "para":
            return (scores > 0).to(scores.dtype)
        return losses.sts_prediction(self.sts_loss, scores)

    def task_parameters(self) -> dict:
        """Trainable parameters by owner: ``'shared'`` (the encoder) then each task's head."""
        groups = {"shared": [p for p in self.encoder.parameters() if p.requires_grad]}
        for task, head in self.heads.items():
            groups[task] = [p for p in head.parameters() if p.requires_grad]
        return groups

    def freeze_encoder(self):
        """The CS224N ``pretrain`` option: only the heads train."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        return self
