"""Tokenizer: BERT's uncased WordPiece on the ``tokenizers`` library, batches out as torch tensors."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from .pretrained import resolve_model_dir


class Tokenizer:
    """Encodes sentences or sentence pairs into ``input_ids``, ``token_type_ids`` and
    ``attention_mask`` ([B, L] int64 tensors), padded to the longest in the batch and truncated
    to ``max_length``. Pairs are encoded as ``[CLS] a [SEP] b [SEP]`` with type ids 0 then 1."""

    def __init__(self, backend: _HFTokenizer, model_max_length: int = 512):
        self._backend = backend
        self.model_max_length = model_max_length
        self.pad_token_id = backend.token_to_id("[PAD]")
        self.cls_token_id = backend.token_to_id("[CLS]")
        self.sep_token_id = backend.token_to_id("[SEP]")
        if None in (self.pad_token_id, self.cls_token_id, self.sep_token_id):
            raise ValueError("the vocabulary must contain [PAD], [CLS] and [SEP]")
        # Padding and truncation are set per call; a tokenizer.json may carry its own.
        backend.no_padding()
        backend.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        """Reads ``tokenizer.json`` from the model directory, or builds the uncased WordPiece
        tokenizer from ``vocab.txt`` (honouring ``do_lower_case`` in ``tokenizer_config.json``)."""
        model_dir = resolve_model_dir(name_or_path)
        settings = {}
        config_file = model_dir / "tokenizer_config.json"
        if config_file.is_file():
            settings = json.loads(config_file.read_text(encoding="utf-8"))
        max_length = settings.get("model_max_length", 512)
        if not isinstance(max_length, int) or max_length > 100_000:  # HF writes a huge int for "unset"
            max_length = 512
        if (model_dir / "tokenizer.json").is_file():
            backend = _HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        elif (model_dir / "vocab.txt").is_file():
            backend = cls.from_vocab(model_dir / "vocab.txt", lowercase=settings.get("do_lower_case", True))._backend
        else:
            raise FileNotFoundError(f"{model_dir} has neither tokenizer.json nor vocab.txt")
        return cls(backend, model_max_length=max_length)

    @classmethod
    def from_vocab(cls, vocab_file, lowercase: bool = True, model_max_length: int = 512) -> "Tokenizer":
        """BERT's WordPiece tokenizer built from a ``vocab.txt``."""
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise FileNotFoundError(f"vocab_file {vocab_file} does not exist")
        wordpiece = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase, strip_accents=None,
                                           clean_text=True, handle_chinese_chars=True)
        return cls(wordpiece._tokenizer, model_max_length=model_max_length)

    def __call__(self, text, text_pair=None, max_length=None, return_tensors="pt") -> dict:
        """Tokenizes a sentence or a list of sentences (and their pairs).

        Returns a dict of [B, L] int64 tensors: ``input_ids``, ``token_type_ids``,
        ``attention_mask``; L is the longest encoding in the batch, at most ``max_length``
        (default: the model's maximum, usually 512). Long pairs are truncated longest-first.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"text_pair has {len(pairs)} entries but text has {len(texts)}")
            inputs = list(zip(texts, pairs))
        else:
            inputs = texts
        for item in texts + ([] if text_pair is None else pairs):
            if not isinstance(item, str):
                raise ValueError(f"text and text_pair must be strings, got {type(item).__name__}")
        if not inputs:
            raise ValueError("text must contain at least one sentence")
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < (4 if text_pair is not None else 2):
            raise ValueError(f"max_length={max_length} leaves no room for the special tokens")
        self._backend.enable_truncation(max_length, strategy="longest_first")
        self._backend.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]", pad_type_id=0)
        try:
            encodings = self._backend.encode_batch(inputs)
        finally:
            self._backend.no_truncation()
            self._backend.no_padding()
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }

    def token_to_id(self, token: str):
        """The id of ``token`` (e.g. ``"[MASK]"``), None when the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    def tokenize(self, text: str) -> list:
        """The WordPiece tokens of one sentence, without special tokens."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
