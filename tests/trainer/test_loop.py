import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_dataset
from trainer import train
from trainer.loop import autocast_dtype, resolve_device

CONTRACT = {
    "train/loss_lm",
    "train/loss_reg",
    "train/loss_total",
    "train/reg_constant",
    "train/grad_norm_lm",
    "train/grad_norm_reg",
}
EVAL = {"val/accuracy", "val/loss_lm", "val/loss_reg", "val/accuracy_choice"}


def _curve(result, key):
    return [m[key] for s, m in result.history if s > 0]  # step 0: the evaluation alone


def test_both_losses_finite_and_falling(tiny_cfg):
    reports = []
    result = train(tiny_cfg(max_steps=40, reg_constant=1.0), lambda s, m: reports.append((s, m)))
    assert [s for s, _ in reports] == list(range(0, 41))  # step 0's evaluation, then each step
    assert reports[0][1].keys() >= EVAL and not reports[0][1].keys() & CONTRACT
    assert all(m.keys() >= CONTRACT for _, m in reports[1:])
    assert [s for s, m in reports if m.keys() >= EVAL] == [0, 10, 20, 30, 40]
    for key in ("train/loss_lm", "train/loss_reg"):
        curve = _curve(result, key)
        assert all(math.isfinite(v) for v in curve)
        assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5]), key
    m = reports[-1][1]
    assert m["train/loss_total"] == pytest.approx(m["train/loss_lm"] + m["train/loss_reg"])
    assert m["train/reg_constant"] == 1.0
    assert m["train/grad_norm_lm"] > 0 and m["train/grad_norm_reg"] > 0


def test_reg_constant_zero_trains_the_head_but_leaves_the_projector_to_the_lm(tiny_cfg, tmp_path):
    off = train(tiny_cfg(max_steps=30, reg_constant=0.0), checkpoint_dir=tmp_path / "off")
    on = train(tiny_cfg(max_steps=30, reg_constant=1.0), checkpoint_dir=tmp_path / "on")
    init = train(
        tiny_cfg(max_steps=1, reg_constant=0.0, lr=1e-12), checkpoint_dir=tmp_path / "init"
    )
    w = {
        n: load_file(tmp_path / n / "checkpoint" / "weights.safetensors")
        for n in ("off", "on", "init")
    }
    assert init.step == 1
    # λ = 0: the head still learns to reconstruct (val/loss_reg measures what the tokens
    # hold at every λ)...
    for k in (k for k in w["off"] if k.startswith("head.")):
        assert not torch.equal(w["off"][k], w["init"][k])
    assert off.metrics["val/loss_reg"] < _curve(off, "train/loss_reg")[0]
    # ...but its input is detached: the projector follows the LM loss alone, so a head of
    # another shape leaves the projector's weights exactly as they were.
    mlp = train(
        tiny_cfg(max_steps=30, reg_constant=0.0, recon_head="mlp"), checkpoint_dir=tmp_path / "mlp"
    )
    assert mlp.step == 30
    w_mlp = load_file(tmp_path / "mlp" / "checkpoint" / "weights.safetensors")
    for k in (k for k in w["off"] if k.startswith("projector.")):
        torch.testing.assert_close(w["off"][k], w_mlp[k], rtol=0, atol=0)
        assert not torch.equal(w["off"][k], w["on"][k])  # λ > 0 does move it
    # λ > 0 pushes the projector to keep the embedding: a lower reconstruction loss
    assert on.metrics["val/loss_reg"] < off.metrics["val/loss_reg"]


@pytest.mark.parametrize("balance", ["none", "running_mean", "uncertainty"])
def test_resume_reproduces_the_uninterrupted_run(tiny_cfg, tmp_path, balance):
    # the balancer's running means and learned weights are in the checkpoint too
    cfg = tiny_cfg(max_steps=12, eval_every=6, checkpoint_every=4, reg_balance=balance)
    whole = train(cfg)

    class Crash(Exception):
        pass

    def crash_at_7(step, m):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, crash_at_7, checkpoint_dir=tmp_path)  # last checkpoint: step 4
    resumed = train(cfg, checkpoint_dir=tmp_path)
    assert [s for s, _ in resumed.history] == list(range(5, 13))  # no step-0 eval on resume
    for (s, a), (_, b) in zip(whole.history[5:], resumed.history, strict=True):
        for key in ("train/loss_lm", "train/loss_reg", "train/lr", "train/loss_total"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (s, key)
    assert whole.metrics["val/accuracy"] == resumed.metrics["val/accuracy"]


def test_checkpoint_of_another_shape_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg(max_steps=2, token_expansion=1), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="token_expansion=1"):
        train(tiny_cfg(max_steps=4, token_expansion=2), checkpoint_dir=tmp_path)


def test_token_expansion_trains_for_several_k(tiny_cfg):
    for k in (2, 4):
        r = train(tiny_cfg(max_steps=3, token_expansion=k, eval_every=3))
        assert math.isfinite(r.metrics["val/loss_lm"])


def test_nan_embeddings_fail_the_run_loudly(tiny_cfg, tmp_path):
    path = make_dataset(tmp_path / "nan", n=40)
    emb = np.load(path / "embeddings.npy")
    emb[3] = np.nan
    np.save(path / "embeddings.npy", emb)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        train(tiny_cfg(dataset=str(path), embedding_norm="l2"))


def test_reference_path_trains_too(tiny_cfg):
    r = train(tiny_cfg(max_steps=4, eval_every=4, lm_path="reference"))
    assert math.isfinite(r.metrics["train/loss_lm"]) and "val/accuracy" in r.metrics


def test_device_and_precision_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bf16_autocast_path_runs_on_cpu(tiny_cfg):
    """The CUDA precision path (bf16 autocast) is exercised here on the CPU."""
    r = train(tiny_cfg(max_steps=3, eval_every=3, precision="bf16"))
    assert math.isfinite(r.metrics["train/loss_lm"])


def test_resume_refuses_a_changed_config_and_a_finished_run_still_reports(tiny_cfg, tmp_path):
    cfg = tiny_cfg(max_steps=4, eval_every=2)
    first = train(cfg, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"reg_constant=0\.1, but this run has reg_constant=0\.5"):
        train(tiny_cfg(max_steps=4, eval_every=2, reg_constant=0.5), checkpoint_dir=tmp_path)
    again = train(cfg, checkpoint_dir=tmp_path)  # nothing left to train: evaluates
    assert again.step == 4 and again.history == []
    assert again.metrics["val/accuracy"] == first.metrics["val/accuracy"]


def test_a_save_cut_between_its_two_renames_still_resumes(tiny_cfg, tmp_path):
    cfg = tiny_cfg(max_steps=6, eval_every=3, checkpoint_every=3)
    train(cfg.model_copy(update={"max_steps": 6}), checkpoint_dir=tmp_path)
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")
    resumed = train(cfg.model_copy(update={"max_steps": 6}), checkpoint_dir=tmp_path)
    assert resumed.step == 6 and resumed.history == []


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.8] * 10),
        ("warmup", [0.8 * min(1, s / 4) for s in range(1, 11)]),
        ("cosine_decay", [0.8 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 9)) for s in range(1, 11)]),
        ("ae_stage", [0.8] * 10),
    ],
)
def test_each_reg_schedule_logs_the_lambda_curve_it_claims(tiny_cfg, schedule, expected):
    reports = []
    cfg = tiny_cfg(max_steps=10, eval_every=10, reg_constant=0.8, reg_schedule=schedule)
    train(cfg.model_copy(update={"reg_schedule_steps": 4}), lambda s, m: s and reports.append(m))
    lams = [m["train/reg_constant"] for m in reports]
    assert lams == pytest.approx(expected)
    if schedule == "cosine_decay":
        assert lams[0] == pytest.approx(0.8) and lams[-1] == pytest.approx(0.0, abs=1e-12)


def test_the_autoencoder_stage_trains_reconstruction_alone_then_switches_the_lm_loss_on(
    tiny_cfg,
):
    reports = []
    cfg = tiny_cfg(
        max_steps=30,
        eval_every=30,
        reg_constant=0.5,
        reg_schedule="ae_stage",
        reg_schedule_steps=20,
    )
    train(cfg, lambda s, m: reports.append((s, m)))
    stage = [m for s, m in reports if 1 <= s <= 20]
    after = [m for s, m in reports if s > 20]
    assert all("train/loss_lm" not in m and "train/grad_norm_lm" not in m for m in stage)
    assert all(m["train/loss_total"] == m["train/loss_reg"] for m in stage)
    assert all("train/loss_lm" in m for m in after)
    # the reconstruction alone is what the stage optimises: it falls
    assert stage[-1]["train/loss_reg"] < 0.8 * stage[0]["train/loss_reg"]


def test_an_autoencoder_stage_as_long_as_the_run_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="must end before max_steps"):
        tiny_cfg(max_steps=10, reg_schedule="ae_stage", reg_schedule_steps=10)


@pytest.mark.parametrize("balance", ["running_mean", "uncertainty"])
def test_loss_balancing_logs_its_weights_and_trains_both_losses(tiny_cfg, balance):
    reports = []
    cfg = tiny_cfg(max_steps=40, eval_every=40, reg_constant=1.0, reg_balance=balance)
    train(cfg, lambda s, m: s and reports.append(m))
    first, last = reports[0], reports[-1]
    for m in (first, last):
        w_lm, w_reg = m["train/balance_lm"], m["train/balance_reg"]
        assert m["train/loss_total"] == pytest.approx(
            w_lm * m["train/loss_lm"] + w_reg * m["train/loss_reg"]
        )
    if balance == "running_mean":  # the first step's weights are 1 / the losses themselves
        assert first["train/balance_lm"] == pytest.approx(1 / first["train/loss_lm"], rel=1e-4)
        assert first["train/balance_reg"] == pytest.approx(1 / first["train/loss_reg"], rel=1e-4)
    else:  # ½·exp(−s) from s = 0, learned: the weights move
        assert first["train/balance_lm"] == pytest.approx(0.5)
        assert last["train/balance_lm"] != pytest.approx(0.5, abs=1e-4)
    assert last["train/loss_lm"] < first["train/loss_lm"]
    assert last["train/loss_reg"] < first["train/loss_reg"]


@pytest.mark.parametrize(
    ("kind", "patches"),
    [
        ("mlp", False),
        ("mlp_residual", False),
        ("moe", False),
        ("qformer", True),
        ("qformer", False),
        ("mlp", True),
    ],
)
def test_each_projector_variant_trains_with_both_losses_falling(
    tiny_cfg, tiny_patch_dataset, kind, patches
):
    reports = []
    data = {"dataset": tiny_patch_dataset} if patches else {}
    cfg = tiny_cfg(max_steps=40, eval_every=40, reg_constant=1.0, projector=kind, **data)
    result = train(cfg, lambda s, m: s and reports.append(m))
    first, last = reports[0], reports[-1]
    assert last["train/loss_lm"] < first["train/loss_lm"]
    assert last["train/loss_reg"] < first["train/loss_reg"]
    assert 0.0 <= result.metrics["val/accuracy"] <= 1.0
    if kind == "moe":  # E·Σ f·P: 1 when the load is even, E when one expert takes it all
        aux = [m["train/moe_aux_loss"] for m in reports]
        assert all(0.0 < a <= cfg.projector_experts + 1e-5 for a in aux)
    else:
        assert "train/moe_aux_loss" not in last


def test_the_linear_probe_is_near_chance_on_random_features_and_high_on_the_embedding():
    from trainer.probe import linear_probe_accuracy

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 600)
    emb = rng.normal(size=(10, 48))[labels] + 0.3 * rng.normal(size=(600, 48))
    noise = rng.normal(size=(600, 48))
    tr, va = slice(0, 400), slice(400, 600)
    raw = linear_probe_accuracy(emb[tr], labels[tr], emb[va], labels[va])
    rand = linear_probe_accuracy(noise[tr], labels[tr], noise[va], labels[va])
    assert raw > 0.95 and rand < 0.2  # chance is 0.1
    print(f"probe: raw embedding {raw:.3f}, random features {rand:.3f} (chance 0.1)")


def test_probe_questions_are_held_out_and_probed(tiny_cfg):
    held = "What digit is shown in the image?"
    reports = []
    cfg = tiny_cfg(max_steps=10, eval_every=10, probe_questions=[held])
    train(cfg, lambda s, m: reports.append(m))
    last = reports[-1]
    assert 0.0 <= last["val/probe_accuracy"] <= 1.0
    assert last["val/probe_accuracy"] == last["val/probe_accuracy/what_digit_is_shown_in_the_image"]
    # the LM is never asked it: no accuracy for it
    assert "val/accuracy_by_question/what_digit_is_shown_in_the_image" not in last
    assert len([k for k in last if k.startswith("val/accuracy_by_question/")]) == 2


def test_probe_questions_must_be_the_dataset_s_and_not_all_of_them(tiny_cfg):
    with pytest.raises(ValueError, match="not a question of this dataset"):
        train(tiny_cfg(max_steps=1, probe_questions=["Is it a cat?"]))
    with pytest.raises(ValueError, match="hold some questions out, not all"):
        from trainer.data import DIGIT_QUESTIONS

        train(tiny_cfg(max_steps=1, probe_questions=list(DIGIT_QUESTIONS)))
