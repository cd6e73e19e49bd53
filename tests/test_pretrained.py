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


def test_bundled_name_resolves(minilm_dir):
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        model = BertModel.from_pretrained(name)
        assert model.model_dir == minilm_dir
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
