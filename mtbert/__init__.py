"""mtbert: fast multitask BERT fine-tuning."""
from .config import BertConfig
from .encode import encode
from .model import BertModel, BertModelOutput
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "BertModelOutput", "Tokenizer", "encode"]
