import pytest
from pydantic import ValidationError

from trainer.config import TrainerConfig, flatten_config, format_validation_error, load_config


@pytest.mark.parametrize(
    ("fields", "path", "words"),
    [
        ({"learning_rate": 0.1}, "learning_rate", "unknown field"),
        ({"reg_constant": -0.5}, "reg_constant", "greater than or equal to 0"),
        ({"token_expansion": 0}, "token_expansion", "greater than or equal to 1"),
        ({"device": "tpu"}, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"betas": [0.9, 1.5]}, "betas", "[0, 1)"),
    ],
)
def test_bad_fields_name_their_path(fields, path, words):
    with pytest.raises(ValidationError) as e:
        TrainerConfig(**fields)
    (line,) = format_validation_error(e.value)
    assert line.startswith(f"{path}: ")
    assert words in line


def test_defaults_are_llava_stage1():
    cfg = TrainerConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.lr_schedule) == (
        1e-3,
        0.0,
        0.03,
        "cosine",
    )
    assert cfg.model == "smollm2-135m" and cfg.dataset == "digits"
    assert all(f.description for f in TrainerConfig.model_fields.values())


def test_load_yaml_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("reg_constant: 0.5\ntoken_expansion: 4\n")
    cfg = load_config(p, {"token_expansion": 2})
    assert (cfg.reg_constant, cfg.token_expansion) == (0.5, 2)
    flat = flatten_config(cfg)
    assert flat["reg_constant"] == 0.5 and flat["betas"] == "0.9,0.999"


@pytest.mark.parametrize("text", ["- a\n- b\n", "a: [1,\n"])
def test_load_rejects_non_mapping_and_bad_yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=str(p)):
        load_config(p)
