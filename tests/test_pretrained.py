"""Loading checkpoints: directories, BertFor... prefixes, .bin files, the HF cache, clear errors."""
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mtbert import BertConfig, BertModel
from mtbert import _extension

TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=24)


def tiny_hf_config():
    return transformers.BertConfig(**TINY, attn_implementation="eager")


def encoder_outputs_match(ours: BertModel, reference: transformers.BertModel):
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    a, b = ours.eval()(ids, mask), reference.eval()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.last_hidden_state[mask.bool()], b.last_hidden_state[mask.bool()], atol=1e-5, rtol=0)


def test_loads_bert_for_sequence_classification_checkpoint(tmp_path):
    """A BertFor... checkpoint stores the encoder under 'bert.' next to its head."""
    classifier = transformers.BertForSequenceClassification(tiny_hf_config())
    classifier.save_pretrained(tmp_path)
    encoder_outputs_match(BertModel.from_pretrained(tmp_path), classifier.bert)


def test_loads_pytorch_model_bin_with_legacy_names(tmp_path):
    reference = transformers.BertModel(tiny_hf_config())
    legacy = {}
    for key, value in reference.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy["bert." + key] = value
    legacy["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    legacy["cls.predictions.bias"] = torch.zeros(TINY["vocab_size"])
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(reference.config.to_dict()))
    encoder_outputs_match(BertModel.from_pretrained(tmp_path), reference)


def test_save_pretrained_loads_into_transformers(tmp_path):
    ours = BertModel(BertConfig(**TINY))
    ours.save_pretrained(tmp_path)
    encoder_outputs_match(ours, transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager"))


def test_config_overrides_apply(minilm_dir):
    model = BertModel.from_pretrained(minilm_dir, hidden_dropout_prob=0.3)
    assert model.config.hidden_dropout_prob == 0.3 and model.config.num_hidden_layers == 6
    assert model.encoder.layer[0].output.dropout.p == 0.3


def test_bundled_name_resolves(bundled_minilm_dir):
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        model = BertModel.from_pretrained(name)
        assert model.model_dir == bundled_minilm_dir
        assert model.config.hidden_size == 384


def test_name_resolves_from_local_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "models--someone--tiny-bert" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--tiny-bert" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-bert" / "refs" / "main").write_text("abc123")
    reference = BertModel(BertConfig(**TINY))
    reference.save_pretrained(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = BertModel.from_pretrained("someone/tiny-bert")
    for (name, a), b in zip(loaded.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_model_error_says_where_it_looked(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Hugging Face cache.*never downloads"):
        BertModel.from_pretrained("bert-base-uncased")
    with pytest.raises(FileNotFoundError, match="directory"):
        BertModel.from_pretrained(tmp_path / "nowhere")


def test_mismatched_checkpoint_is_rejected(tmp_path):
    model = BertModel(BertConfig(**TINY))
    model.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if "layer.1." not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        BertModel.from_pretrained(tmp_path)


def test_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "IMPORT_ERROR", ImportError("no module named mtbert._C"))
    with pytest.raises(RuntimeError, match="make build"):
        _extension.ops()


# -- random-init checkpoints (python -m mtbert.pretrained random-init) --------------------------------

def config_source(directory, **overrides):
    """A checkpoint directory without weights: TINY's config.json and a 60-token vocab.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"word{i}" for i in range(TINY["vocab_size"] - 5)]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    BertConfig(**{**TINY, **overrides}).save(directory)
    return directory


def test_random_init_checkpoint_loads_everywhere_with_the_same_outputs(tmp_path, capsys):
    from mtbert import Tokenizer
    from mtbert.pretrained import main

    source = config_source(tmp_path / "source")
    state_before = torch.get_rng_state()
    assert main(["random-init", "--config", str(source), "--out", str(tmp_path / "random"), "--seed", "3"]) == 0
    assert "written to" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), state_before)  # the caller's random stream is untouched
    ours = BertModel.from_pretrained(tmp_path / "random")
    theirs = transformers.BertModel.from_pretrained(tmp_path / "random", attn_implementation="eager")
    encoder_outputs_match(ours, theirs)
    assert Tokenizer.from_pretrained(tmp_path / "random")("word3 word7")["input_ids"].tolist() == [[2, 8, 12, 3]]
    # BERT's initialisation as BertModel itself draws it from that seed; another seed draws other weights.
    torch.manual_seed(3)
    for (name, a), b in zip(ours.state_dict().items(), BertModel(BertConfig(**TINY)).state_dict().values()):
        assert torch.equal(a, b), name
    assert main(["random-init", "--config", str(source), "--out", str(tmp_path / "other"), "--seed", "4"]) == 0
    other = BertModel.from_pretrained(tmp_path / "other")
    assert not torch.equal(other.embeddings.word_embeddings.weight, ours.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("breakage,message", [
    ("no config.json", "has no config.json"),
    ("config.json not JSON", "is not a usable BERT config"),
    ("hidden_size not divisible", "is not a usable BERT config: hidden_size"),
    ("no tokenizer files", "has no tokenizer files"),
    ("vocab larger than the config's", "more than config.json's vocab_size 20"),
    ("out holds a model", "already holds a model.safetensors"),
])
def test_random_init_refuses_bad_config_dirs_in_one_line(tmp_path, capsys, breakage, message):
    from mtbert.pretrained import main

    source = config_source(tmp_path / "source", **({"vocab_size": 20} if breakage.startswith("vocab") else {}))
    out = tmp_path / "out"
    if breakage == "no config.json":
        (source / "config.json").unlink()
    elif breakage == "config.json not JSON":
        (source / "config.json").write_text("{not json")
    elif breakage == "hidden_size not divisible":
        (source / "config.json").write_text(json.dumps({**TINY, "num_attention_heads": 5}))
    elif breakage == "no tokenizer files":
        (source / "vocab.txt").unlink()
    elif breakage == "out holds a model":
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"a real checkpoint")
    assert main(["random-init", "--config", str(source), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m mtbert.pretrained: error: ") and message in error and error.count("\n") == 1
    if breakage == "out holds a model":
        assert (out / "model.safetensors").read_bytes() == b"a real checkpoint"
