"""BertConfig: the hyper-parameters of a BERT encoder, read from a Hugging Face ``config.json``."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    # "gelu" is the exact erf GELU, as in Hugging Face and the original BERT release.
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # 1e-12 is BERT's value; it matters only for rows of (near-)constant activations.
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Only absolute learned positions exist in BERT checkpoints we support.
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (exact erf GELU), got {self.hidden_act!r}")
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"position_embedding_type must be 'absolute', got {self.position_embedding_type!r}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict) -> "BertConfig":
        """Builds a config from a Hugging Face config dict; keys BERT does not use are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json_file(cls, path) -> "BertConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return {"model_type": "bert", "architectures": ["BertModel"], **dataclasses.asdict(self)}

    def save(self, directory) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
