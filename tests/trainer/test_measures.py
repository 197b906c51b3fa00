"""The information measures (issue 16): probe ceiling and retained fraction, the step-0
floor, the gradient cosine, the late question, paired seeds, the test split, the layouts."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_dataset
from trainer import train
from trainer.batches import QuestionGroups, normalise
from trainer.data import DIGIT_CHOICES, digits_examples, load_dataset, write_dataset
from trainer.loop import shared_lm
from trainer.model import (
    Batch,
    Projector,
    PromptCache,
    ReconHead,
    answer_logits_image_first,
    answer_logits_reference,
    lm_loss,
    reg_loss,
)
from trainer.probe import chance_accuracy, linear_probe_accuracy

TINT = "What colour is the digit?"
DIGIT = "What digit is shown in the image?"


def make_factor_dataset(out: Path, n: int = 150, dim: int = 48, seed: int = 0) -> Path:
    """A user's own dataset folder: digit-like embeddings plus an independent tint (3 values,
    drawn apart from the digit) that the embedding also carries."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    tints = rng.choice(["red", "green", "blue"], size=n, p=[0.5, 0.3, 0.2])
    tint_dir = {t: rng.normal(size=dim) for t in ("red", "green", "blue")}
    emb = rng.normal(size=(10, dim))[labels] + 0.3 * rng.normal(size=(n, dim))
    emb += np.stack([tint_dir[t] for t in tints])
    examples = digits_examples(labels)
    split = {ex["image"]: ex["split"] for ex in examples}
    examples += [
        {"image": i, "question": TINT, "answer": str(tints[i]), "split": split[i]} for i in range(n)
    ]
    return write_dataset(out, emb, examples, {"choices": DIGIT_CHOICES})


@pytest.fixture(scope="module")
def factor_dataset(tmp_path_factory) -> str:
    return str(make_factor_dataset(tmp_path_factory.mktemp("factors") / "ds"))


def test_the_probe_has_its_ceiling_chance_and_retained_fraction(tiny_cfg, factor_dataset):
    reports = {}
    cfg = tiny_cfg(dataset=factor_dataset, max_steps=10, eval_every=5, probe_questions=[TINT])
    train(cfg, lambda s, m: reports.__setitem__(s, m))
    assert sorted(s for s, m in reports.items() if "val/probe_accuracy" in m) == [0, 5, 10]

    # The ceiling is the same probe fitted by hand on the normalised raw embeddings.
    data = load_dataset(factor_dataset)
    train_rows = np.unique([ex["image"] for ex in data.examples["train"]])
    emb = normalise(data.pooled(), train_rows, "standardize")
    by = {
        s: sorted({(x["image"], x["answer"]) for x in data.examples[s] if x["question"] == TINT})
        for s in ("train", "val")
    }
    x_tr, y_tr = emb[[i for i, _ in by["train"]]], np.array([a for _, a in by["train"]])
    x_va, y_va = emb[[i for i, _ in by["val"]]], np.array([a for _, a in by["val"]])
    ceiling = linear_probe_accuracy(x_tr, y_tr, x_va, y_va)
    chance = float(np.mean(y_va == "red"))  # red is the most frequent train answer
    assert chance == chance_accuracy(y_tr, y_va)
    for m in reports.values():
        if "val/probe_accuracy" not in m:
            continue
        assert m["val/probe_ceiling"] == pytest.approx(ceiling)
        assert m["val/probe_ceiling/what_colour_is_the_digit"] == pytest.approx(ceiling)
        want = (m["val/probe_accuracy"] - chance) / (ceiling - chance)
        assert m["val/probe_retained"] == pytest.approx(want)
        assert m["val/probe_chance"] == pytest.approx(chance)
    assert ceiling > chance + 0.2  # the raw embedding carries the tint
    # step 0 is the untrained projector: the floor is on record, as a report of its own
    assert "train/loss_lm" not in reports[0] and "val/accuracy" in reports[0]


def test_grad_cos_matches_gradients_computed_by_hand(tiny_cfg, tiny_dataset):
    cfg = tiny_cfg(
        max_steps=1,
        eval_every=1,
        eval_at_start=False,
        reg_constant=0.7,
        seed=5,
        prompt_layout="image_first",
    )
    seen = {}
    train(cfg, lambda s, m: seen.update(m))

    # The same first step, by hand: same seed, same batch, same initialisation.
    data = load_dataset(tiny_dataset)
    lm, tok = shared_lm("tiny-llama", "cpu")
    prompts = PromptCache(lm, tok, torch.device("cpu"))
    train_rows = np.unique([ex["image"] for ex in data.examples["train"]])
    emb = torch.from_numpy(normalise(data.pooled(), train_rows, "standardize")).float()
    groups = QuestionGroups(data.examples["train"], prompts, torch.device("cpu"))
    batch = groups.sample(cfg.seed, 1, cfg.batch_size, emb)
    lm_dim = lm.config.hidden_size
    torch.manual_seed(cfg.seed)
    projector = Projector(data.dim, lm_dim, 1, cfg.projector_width_for(lm_dim))
    head = ReconHead(lm_dim, 1, data.dim)
    tokens = projector(batch.embeddings)
    loss_lm = lm_loss(answer_logits_image_first(lm, prompts, batch, tokens), batch)
    loss_reg = reg_loss(head(tokens), batch.embeddings).mean()
    g_lm = torch.autograd.grad(loss_lm, list(projector.parameters()), retain_graph=True)
    g_reg = torch.autograd.grad(loss_reg, list(projector.parameters()))
    a, b = torch.cat([g.flatten() for g in g_lm]), torch.cat([g.flatten() for g in g_reg])
    assert seen["train/loss_lm"] == pytest.approx(loss_lm.item(), rel=1e-5)
    assert seen["train/grad_norm_lm"] == pytest.approx(a.norm().item(), rel=1e-4)
    assert seen["train/grad_norm_reg"] == pytest.approx(b.norm().item(), rel=1e-4)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert seen["train/grad_cos"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert -1.0 <= seen["train/grad_cos"] <= 1.0


def test_seed_fixes_initialisation_and_batch_order_across_configurations(
    tiny_cfg, tmp_path, monkeypatch
):
    drawn: list[tuple] = []
    real = QuestionGroups.sample

    def record(self, seed, step, *args, **kw):
        b = real(self, seed, step, *args, **kw)
        drawn.append((step, b.question, tuple(b.answers), b.embeddings.sum().item()))
        return b

    monkeypatch.setattr(QuestionGroups, "sample", record)
    runs = {}
    for name, lam, seed in (("a", 0.1, 3), ("b", 2.0, 3), ("c", 0.1, 4)):
        drawn.clear()
        out = tmp_path / name
        train(tiny_cfg(max_steps=6, reg_constant=lam, seed=seed, lr=1e-12), checkpoint_dir=out)
        from safetensors.torch import load_file

        w = load_file(out / "checkpoint" / "weights.safetensors")
        runs[name] = (list(drawn), w)
    assert runs["a"][0] == runs["b"][0]  # same seed, another λ: the same batches
    assert runs["a"][0] != runs["c"][0]  # another seed: other batches
    for k, v in runs["a"][1].items():  # lr ≈ 0: the weights are the initialisation
        torch.testing.assert_close(v, runs["b"][1][k], atol=1e-9, rtol=0)
    assert any(not torch.allclose(v, runs["c"][1][k]) for k, v in runs["a"][1].items())


def test_a_delayed_question_joins_training_at_its_step(tiny_cfg, factor_dataset, monkeypatch):
    asked: list[tuple[int, str]] = []
    real = QuestionGroups.sample

    def record(self, seed, step, *args, **kw):
        b = real(self, seed, step, *args, **kw)
        asked.append((step, b.question))
        return b

    monkeypatch.setattr(QuestionGroups, "sample", record)
    reports = {}
    cfg = tiny_cfg(
        dataset=factor_dataset, max_steps=30, eval_every=10, delayed_questions={TINT: 15}
    )
    train(cfg, lambda s, m: reports.__setitem__(s, m))
    assert all(q != TINT for s, q in asked if s < 15)
    assert any(q == TINT for s, q in asked if s >= 15)
    slug = "what_colour_is_the_digit"
    for s in (0, 10, 20, 30):  # evaluated from the start: its NLL has more power than accuracy
        assert math.isfinite(reports[s][f"val/loss_lm_by_question/{slug}"])
        assert 0.0 <= reports[s][f"val/accuracy_by_question/{slug}"] <= 1.0
    # training on it lowers its NLL
    assert (
        reports[30][f"val/loss_lm_by_question/{slug}"]
        < reports[10][f"val/loss_lm_by_question/{slug}"]
    )


def test_delayed_and_probe_questions_are_checked(tiny_cfg):
    with pytest.raises(ValueError, match="either held out or delayed"):
        tiny_cfg(probe_questions=[DIGIT], delayed_questions={DIGIT: 5})
    with pytest.raises(ValueError, match=r"joins at step 50, but steps run 1\.\.20"):
        tiny_cfg(delayed_questions={DIGIT: 50})
    with pytest.raises(ValueError, match="not a question of this dataset"):
        train(tiny_cfg(max_steps=1, delayed_questions={"Is it a cat?": 1}))


def test_the_test_split_is_evaluated_only_at_the_end_when_asked(tiny_cfg):
    reports = {}
    train(
        tiny_cfg(max_steps=10, eval_every=5, test_at_end=True), lambda s, m: reports.update({s: m})
    )
    assert [s for s, m in reports.items() if "test/accuracy" in m] == [10]
    assert {"test/loss_lm", "test/loss_reg"} <= reports[10].keys()
    off = {}
    train(tiny_cfg(max_steps=5, eval_every=5), lambda s, m: off.update(m))
    assert not any(k.startswith("test/") for k in off)


def test_image_first_fast_path_matches_the_reference_at_the_answer():
    lm, tok = shared_lm("tiny-llama", "cpu")
    prompts = PromptCache(lm, tok, torch.device("cpu"))
    ids = [prompts.answer_ids(a) for a in ("3", "17")]
    a = max(map(len, ids))
    padded = torch.zeros(2, a, dtype=torch.long)
    for i, x in enumerate(ids):
        padded[i, : len(x)] = torch.tensor(x)
    mask = torch.arange(a)[None] < torch.tensor([len(x) for x in ids])[:, None]
    b = Batch(DIGIT, torch.randn(2, 48), padded, mask, ["3", "17"])
    tokens = torch.randn(2, 4, lm.config.hidden_size)
    fast = answer_logits_image_first(lm, prompts, b, tokens)
    ref = answer_logits_reference(lm, prompts, b, tokens)
    assert fast.shape == ref.shape == (2, a, lm.config.vocab_size)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["image_first", "question_first"])
def test_both_prompt_layouts_train(tiny_cfg, layout):
    r = train(tiny_cfg(max_steps=4, eval_every=4, prompt_layout=layout))
    assert math.isfinite(r.metrics["val/loss_lm"])


def test_token_expansion_widens_the_projector_channel(tiny_cfg):
    cfg = tiny_cfg(token_expansion=4)
    assert cfg.projector_width_for(64) == 256
    assert cfg.model_copy(update={"projector_width": "fixed"}).projector_width_for(64) == 64
    assert cfg.model_copy(update={"projector_hidden": 10}).projector_width_for(64) == 40
    p = Projector(48, 64, 4, cfg.projector_width_for(64))
    assert p.net[0].out_features == 256


def test_the_uncertainty_weights_move_at_their_own_lr(tiny_cfg):
    def last_weight(**kw):
        seen = {}
        cfg = tiny_cfg(max_steps=30, eval_every=30, reg_constant=1.0, reg_balance="uncertainty")
        train(cfg.model_copy(update=kw), lambda s, m: seen.update(m))
        return seen["train/balance_reg"]

    slow, fast = last_weight(lr=1e-3), last_weight(lr=1e-3, balance_lr=0.05)
    assert abs(fast - 0.5) > 5 * abs(slow - 0.5)


def test_make_dataset_keeps_the_old_shape(tmp_path):
    # the user-folder format is unchanged: the digits-like fixture still loads
    ds = load_dataset(str(make_dataset(tmp_path / "d", n=20)))
    assert ds.embeddings.shape == (20, 48)
