"""A trained multitask model for prediction: loaded from a run's checkpoint (``best.pt`` or
``last.pt``) or from an exported directory, ``predict(task, texts)``, and ``export(directory)``.

An export is a Hugging Face model directory (``config.json``, ``model.safetensors``, the
tokenizer's files: loadable by ``transformers.BertModel`` and ``mtbert.BertModel``) with the task
heads beside it (``heads.safetensors``, ``heads.json``)."""
import copy
import json
import shutil
from pathlib import Path

import torch

from ..config import BertConfig
from ..errors import CheckpointError, ConfigError, MissingFileError
from ..model import BertModel
from ..pretrained import resolve_model_dir
from ..tokenizer import Tokenizer
from . import evaluate as evaluation
from .checkpoint import load_checkpoint
from .data import TASKS, Example
from .model import MultitaskBert

HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"
# The tokenizer files an export copies from the run's base model, when it has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# The settings of a run that shape the model and its inputs, as TrainConfig names them.
_HEAD_SETTINGS = ("pooling", "para_head", "sts_head", "sts_loss")


class Predictor:
    """A :class:`MultitaskBert` in evaluation mode, its tokenizer and the settings it was trained
    with. ``tasks``: the tasks whose heads were trained (the others are left at random);
    ``run_config``: the run's settings (a ``TrainConfig`` dict) when loaded from its checkpoint."""

    def __init__(self, model: MultitaskBert, tokenizer: Tokenizer, tasks=TASKS, max_length=128, base_model=None,
                 batch_size=128, device="cpu", run_config=None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.tasks = tuple(tasks)
        self.max_length = max_length
        self.base_model = base_model  # where the tokenizer files come from, for export()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.run_config = run_config
        self.progress = False  # a progress bar per task and file (mtbert-predict turns it on)
        self.bf16 = False  # bfloat16 autocast, as mtbert-train --bf16 evaluates

    @classmethod
    def from_checkpoint(cls, path, device="cpu", batch_size=128) -> "Predictor":
        """The model of a training checkpoint of ``mtbert-train`` (``best.pt`` or ``last.pt``)."""
        state = load_checkpoint(path)
        config = state.get("config")
        if not (isinstance(config, dict) and isinstance(state.get("model"), dict)
                and {"model", "tasks", "max_length", *_HEAD_SETTINGS} <= config.keys()):
            raise CheckpointError(f"checkpoint {path} is not a checkpoint of mtbert-train (best.pt or last.pt of a "
                                  f"run: a dict with 'config' and 'model'); it has keys {sorted(state)[:8]}")
        if "encoder_config" in state:
            encoder = BertModel(BertConfig.from_dict(state["encoder_config"]))
        else:  # a best.pt written before encoder_config was stored: the base model's config.json
            encoder = BertModel.from_pretrained(config["model"])
        model = MultitaskBert(encoder, **{name: config[name] for name in _HEAD_SETTINGS})
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path} does not match the model its settings describe: "
                                  f"{str(err).splitlines()[0]}") from None
        return cls(model, Tokenizer.from_pretrained(config["model"]), config["tasks"], config["max_length"],
                   base_model=config["model"], batch_size=batch_size, device=device, run_config=config)

    @classmethod
    def from_pretrained(cls, directory, device="cpu", batch_size=128) -> "Predictor":
        """The model of a directory written by :meth:`export`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / HEADS_CONFIG).is_file():
            raise MissingFileError(f"{directory} is not an mtbert export: it has no {HEADS_CONFIG} "
                                   "(write one with mtbert-predict --checkpoint RUN/best.pt --export DIR)")
        settings = json.loads((directory / HEADS_CONFIG).read_text(encoding="utf-8"))
        model = MultitaskBert(BertModel.from_pretrained(directory), **{k: settings[k] for k in _HEAD_SETTINGS})
        model.heads.load_state_dict(load_file(str(directory / HEADS_WEIGHTS)))
        return cls(model, Tokenizer.from_pretrained(directory), settings["tasks"], settings["max_length"],
                   base_model=directory, batch_size=batch_size, device=device)

    @classmethod
    def load(cls, path, device="cpu", batch_size=128) -> "Predictor":
        """:meth:`from_pretrained` for a directory, :meth:`from_checkpoint` for a file."""
        loader = cls.from_pretrained if Path(path).is_dir() else cls.from_checkpoint
        return loader(path, device=device, batch_size=batch_size)

    def _check_task(self, task):
        if task not in self.tasks:
            raise ValueError(f"task must be one of the trained tasks {self.tasks}, got {task!r}")

    def predict(self, task, texts) -> torch.Tensor:
        """Predictions for ``texts``: sentences for ``sst`` (class 0–4), (sentence1, sentence2)
        pairs for ``para`` (1.0 paraphrase / 0.0) and ``sts`` (similarity 0–5)."""
        self._check_task(task)
        width = 1 if task == "sst" else 2
        examples = []
        for i, text in enumerate(texts):
            parts = (text,) if isinstance(text, str) else tuple(text)
            if len(parts) != width or not all(isinstance(part, str) for part in parts):
                what = "a string" if width == 1 else "a (sentence1, sentence2) pair of strings"
                raise ValueError(f"texts[{i}] must be {what} for task {task!r}, got {text!r}")
            examples.append(Example(str(i), parts))
        return self.predict_examples(task, examples) if examples else torch.empty(0)

    def head_scores(self, task, examples) -> torch.Tensor:
        """The head's raw scores for :class:`~mtbert.multitask.data.Example` rows: [N, 5] logits
        for ``sst``, [N] for the pair tasks."""
        return evaluation.head_scores(self.model, task, examples, self.tokenizer, batch_size=self.batch_size,
                                      max_length=self.max_length, device=self.device, progress=self.progress,
                                      autocast=self._autocast if self.bf16 else None)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def predict_examples(self, task, examples) -> torch.Tensor:
        """Predictions for :class:`~mtbert.multitask.data.Example` rows (e.g. a file's)."""
        self._check_task(task)
        return self.model.predict(task, self.head_scores(task, examples))

    def score(self, task_files) -> tuple:
        """Predictions for each labeled or unlabeled :class:`TaskFile` ({task: TaskFile}) and the
        metrics of the labeled ones (with the overall score when all three tasks are labeled).
        Returns ``(metrics, {task: predictions})``."""
        predictions = {task: self.predict_examples(task, f.examples) for task, f in task_files.items()}
        return evaluation.file_metrics(task_files, predictions), predictions

    def export(self, directory) -> Path:
        """Writes the encoder with ``save_pretrained`` (config.json, model.safetensors), the
        tokenizer's files and the heads (heads.safetensors, heads.json) into ``directory``."""
        from safetensors.torch import save_file

        from ..errors import make_directory

        directory = make_directory(Path(directory), "export directory")
        self.model.encoder.save_pretrained(directory)
        copy_tokenizer_files(resolve_model_dir(self.base_model), directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.heads.state_dict().items()},
                  str(directory / HEADS_WEIGHTS))
        settings = {**self.model.head_config, "tasks": list(self.tasks), "max_length": self.max_length}
        (directory / HEADS_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return directory



def copy_tokenizer_files(source, directory):
    """Copies the tokenizer's files of model directory ``source`` into ``directory`` (a
    ``save_pretrained`` directory then loads with its tokenizer)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and source.resolve() != directory.resolve():
            shutil.copy(source / name, directory / name)


def _same_heads(members, purpose):
    """Raises a ConfigError unless every member has the same heads and losses."""
    settings = [{k: m.model.head_config[k] for k in _HEAD_SETTINGS} for m in members]
    if not members or any(s != settings[0] for s in settings):
        raise ConfigError(f"{purpose} needs at least one model, all with the same heads and losses; got {settings}")


def average_weights(members) -> Predictor:
    """One model whose every weight is the mean of the members' (checkpoint averaging: models
    saved along one run, e.g. with ``--keep-checkpoints``, average into a smoother one; models of
    separate runs do not, their weights are not aligned). The first member's tokenizer and settings."""
    members = list(members)
    _same_heads(members, "averaging weights")
    states = [member.model.state_dict() for member in members]
    if any(state.keys() != states[0].keys() for state in states):
        raise ConfigError("averaging weights needs models of one architecture: their weights differ in names")
    averaged = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            averaged[key] = torch.stack([state[key].double() for state in states]).mean(dim=0).to(value.dtype)
        else:
            averaged[key] = value
    first = members[0]
    model = copy.deepcopy(first.model)
    model.load_state_dict(averaged)
    return Predictor(model, first.tokenizer, first.tasks, first.max_length, first.base_model, first.batch_size,
                     first.device, first.run_config)


class Ensemble(Predictor):
    """Several models of one configuration (e.g. the same run with other seeds) predicting
    together: each member's head scores (SST and paraphrase logits, the STS score) are averaged,
    then turned into predictions as one model's would be. Costs one forward pass per member."""

    def __init__(self, members):
        members = list(members)
        _same_heads(members, "an ensemble")
        first = members[0]
        tasks = [t for t in first.tasks if all(t in m.tasks for m in members)]
        super().__init__(first.model, first.tokenizer, tasks, first.max_length, first.base_model, first.batch_size,
                         first.device, first.run_config)
        self.members = members

    def head_scores(self, task, examples) -> torch.Tensor:
        return torch.stack([member.head_scores(task, examples) for member in self.members]).mean(dim=0)

    def export(self, directory):
        raise ValueError("an ensemble has no single encoder to export: export one member's checkpoint")
