"""data_prep.text_ids: class names as text, the two tokenizer file formats (each read by its own library,
compared with that library called directly), and the checks around them (tokenization job settings,
manifest vs model, generation's condition ids). The end-to-end run is tests/distributed/test_text_conditioning.py."""

from __future__ import annotations

import hashlib

import pytest
import torch

from data_prep.text_ids import TextTokenizer, class_name_text, load_text_tokenizer
from data_prep.tokenize_job import TokenizeConfig
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.pipeline import condition_batch
from tests.distributed.test_text_conditioning import TEXT_VOCAB, train_sentencepiece

WORDS = {"[UNK]": 0, "<s>": 1, "</s>": 2, "apply": 3, "eye": 4, "makeup": 5, "yo": 6, "playing": 7, "daf": 8}


@pytest.fixture(scope="module")
def word_level_json(tmp_path_factory):
    """A tokenizers WordLevel tokenizer.json whose post-processor adds <s> (as LLaMA's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(WORDS, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("texttok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("name, text", [
    ("ApplyEyeMakeup", "apply eye makeup"), ("YoYo", "yo yo"), ("PlayingDaf", "playing daf"),
    ("TaiChi", "tai chi"), ("Skijet", "skijet"), ("BlowDryHair", "blow dry hair"), ("already text", "already text"),
])
def test_class_name_text_splits_at_case_boundaries_and_lowers(name, text):
    assert class_name_text(name) == text


def test_tokenizer_json_ids_are_the_words_after_the_bos(word_level_json):
    text = TextTokenizer.load(word_level_json)
    assert (text.kind, text.vocab_size) == ("tokenizers", len(WORDS))
    assert text.class_name_ids("ApplyEyeMakeup") == [1, 3, 4, 5]
    assert text.class_name_ids("YoYo") == [1, 6, 6]
    assert text.encode("playing guitar") == [1, 7, 0]
    assert text.sha256 == hashlib.sha256(word_level_json.read_bytes()).hexdigest()


def test_sentencepiece_ids_equal_the_library_with_bos(tmp_path):
    import sentencepiece as spm

    path = train_sentencepiece(tmp_path / "t.model", TEXT_VOCAB)
    text = load_text_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (text.kind, text.vocab_size) == ("sentencepiece", TEXT_VOCAB)
    assert text.class_name_ids("PlayingDaf") == [sp.bos_id(), *sp.encode("playing daf")] and sp.bos_id() == 1
    assert load_text_tokenizer(text) is text
    entry = text.manifest_entry()
    assert entry["vocab_size"] == TEXT_VOCAB and entry["sha256"] == text.sha256 and entry["path"] == str(path)


def test_unreadable_or_missing_files_are_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="cannot read text tokenizer .*tokenizer.model with sentencepiece"):
        TextTokenizer.load(bad)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="with tokenizers"):
        TextTokenizer.load(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="text tokenizer file not found"):
        TextTokenizer.load(tmp_path / "missing.model")


def test_tokenize_job_needs_class_folders_for_text(tmp_path, word_level_json):
    cfg = TokenizeConfig(input_dir=tmp_path, output_dir=tmp_path / "out", tokenizer=tmp_path / "t.safetensors",
                         text_tokenizer=word_level_json)
    with pytest.raises(ValueError, match="--text-tokenizer .* needs --label-from-dir"):
        cfg.validate()
    cfg.replace(label_from_dir=True).validate()
    assert "text_tokenizer_sha256" not in cfg.shard_settings()
    assert cfg.shard_settings("ab" * 32)["text_tokenizer_sha256"] == "ab" * 32


def text_model(vocab: int, p: int = 4) -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=1, ffn_hidden_size=16, vocab_size=64,
                       latent_shape=(1, 2, 4), block_shape=(1, 1, 2), layout="hybrid", condition_type="text",
                       text_vocab_size=vocab, num_condition_tokens=p, condition_frames=1)


def test_manifest_text_vocabulary_must_equal_the_models(word_level_json):
    layout = text_model(len(WORDS)).token_layout
    entry = TextTokenizer.load(word_level_json).manifest_entry()
    assert layout.manifest_problems({"text_tokenizer": entry, "labels": ["YoYo"]}) == []
    assert layout.manifest_problems({"labels": []}) == []          # text ids written by the user's own step
    problems = text_model(32000).token_layout.manifest_problems({"text_tokenizer": entry})
    assert problems == [f"shards hold text ids of the text tokenizer {word_level_json} ({len(WORDS)} ids), but "
                        f"model.text_vocab_size is 32000"]


def test_generation_condition_of_class_names_through_the_text_tokenizer(word_level_json):
    cfg = text_model(len(WORDS))
    condition, padding = condition_batch(cfg, class_names=["ApplyEyeMakeup", "YoYo"], num_samples=2,
                                         text_tokenizer=word_level_json)
    assert condition.tolist() == [[1, 3, 4, 5]] * 2 + [[1, 6, 6, 0]] * 2
    assert padding.tolist() == [[False] * 4] * 2 + [[False, False, False, True]] * 2
    raw = condition_batch(cfg, text_ids=[[1, 3, 4, 5], [1, 6, 6]], num_samples=2)
    assert torch.equal(raw[0], condition) and torch.equal(raw[1], padding)
    with pytest.raises(ValueError, match="give text_tokenizer"):
        condition_batch(cfg, class_names=["YoYo"])
    with pytest.raises(ValueError, match=f"has {len(WORDS)} ids, the model's text_vocab_size is 50"):
        condition_batch(text_model(50), class_names=["YoYo"], text_tokenizer=word_level_json)
    with pytest.raises(ValueError, match="takes text_ids, not class_names"):
        condition_batch(cfg, class_names=["YoYo"], text_ids=[[1]], text_tokenizer=word_level_json)
