"""mtbert: fast multitask BERT fine-tuning."""
from .config import BertConfig
from .encode import encode
from .model import BertModel, BertModelOutput
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "BertModelOutput", "MultitaskBert", "Tokenizer", "encode"]


def __getattr__(name):
    # Lazy: the encoder package does not depend on the multitask layer built on top of it.
    if name == "MultitaskBert":
        from .multitask.model import MultitaskBert

        return MultitaskBert
    raise AttributeError(f"module 'mtbert' has no attribute {name!r}")
