import torch

from trainer.loop import shared_lm
from trainer.model import (
    FAST_PREFIX,
    Batch,
    Projector,
    PromptCache,
    ReconHead,
    answer_logits_fast,
    exact_match,
    reg_loss,
)


def _batch(prompts: PromptCache, answers: list[str], dim: int = 48) -> Batch:
    ids = [prompts.answer_ids(a) for a in answers]
    a = max(map(len, ids))
    padded = torch.zeros(len(ids), a, dtype=torch.long)
    for i, x in enumerate(ids):
        padded[i, : len(x)] = torch.tensor(x)
    mask = torch.arange(a)[None] < torch.tensor([len(x) for x in ids])[:, None]
    return Batch(
        "What digit is shown in the image?", torch.randn(len(ids), dim), padded, mask, answers
    )


def test_projector_gives_k_tokens_per_embedding():
    for k in (1, 3, 8):
        tokens = Projector(48, 64, k)(torch.randn(5, 48))
        assert tokens.shape == (5, k, 64)
        assert ReconHead(64, k, 48)(tokens).shape == (5, 48)


def test_fast_path_feeds_k_image_tokens_and_matches_a_full_forward():
    """The cached-prefix path gives the same logits as one uncached pass over the same text."""
    lm, tok = shared_lm("tiny-llama", "cpu")
    prompts = PromptCache(lm, tok, torch.device("cpu"))
    k = 3
    b = _batch(prompts, ["3", "7"])
    tokens = torch.randn(2, k, lm.config.hidden_size)
    seen = []
    hook = lm.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("inputs_embeds")), with_kwargs=True
    )
    try:
        fast = answer_logits_fast(lm, prompts, b, tokens)
    finally:
        hook.remove()
    assert seen[-1].shape[1] == k + b.answer_ids.shape[1] - 1  # k image tokens, then the answer

    emb = lm.get_input_embeddings()
    prefix = emb(prompts.ids(FAST_PREFIX.format(question=b.question)))[None].expand(2, -1, -1)
    full = torch.cat([prefix, tokens, emb(b.answer_ids[:, :-1])], dim=1)
    ref = lm(inputs_embeds=full).logits[:, -b.answer_ids.shape[1] :]
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_exact_match_on_a_hand_made_case():
    # answers: [5, eos] for both; example 0 predicts both right, example 1 misses eos.
    ids = torch.tensor([[5, 1], [5, 1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    logits = torch.zeros(2, 2, 8)
    logits[0, 0, 5] = logits[0, 1, 1] = 1.0
    logits[1, 0, 5] = logits[1, 1, 4] = 1.0
    b = Batch("q", torch.zeros(2, 4), ids, mask, ["a", "b"])
    assert exact_match(logits, b).tolist() == [True, False]
    # padding never counts: example 1's answer is one token shorter, its pad slot is ignored
    mask[1, 1] = False
    assert exact_match(logits, b).tolist() == [True, True]


def test_reg_loss_ignores_scale_and_spans_zero_to_two():
    x = torch.randn(4, 16)
    assert torch.allclose(reg_loss(3 * x, x), torch.zeros(4), atol=1e-6)
    assert torch.allclose(reg_loss(-x, x), torch.full((4,), 2.0), atol=1e-6)


def test_moe_projector_routes_each_embedding_to_two_experts():
    torch.manual_seed(0)
    proj = Projector(48, 64, 2, kind="moe", experts=4)
    x = torch.randn(32, 48)
    out = proj(x)
    assert out.shape == (32, 2, 64)
    # the same as mixing the two top experts by hand
    probs = torch.softmax(proj.router(x), -1)
    top, idx = probs.topk(2, -1)
    gates = top / top.sum(-1, keepdim=True)
    by_hand = sum(
        gates[:, j, None] * torch.stack([proj.experts[e](x[i]) for i, e in enumerate(idx[:, j])])
        for j in range(2)
    )
    assert torch.allclose(out.flatten(1), by_hand, atol=1e-5)
    assert 0.0 < proj.aux_loss.item() <= 4.0


def test_residual_projector_carries_the_embedding_linearly():
    proj = Projector(48, 64, 1, kind="mlp_residual")
    x = torch.randn(3, 48)
    assert torch.allclose(proj(x).flatten(1), proj.net(x) + proj.skip(x))


def test_qformer_queries_attend_to_the_patches():
    torch.manual_seed(0)
    proj = Projector(48, 64, 3, hidden=32, kind="qformer", layers=2, patches=4)
    x = torch.randn(5, 4, 48)
    out = proj(x.mean(1), x)
    assert out.shape == (5, 3, 64)  # k tokens, whatever the number of patches
    changed = x.clone()
    changed[0, 2] += 1.0  # one patch of the first image
    again = proj(changed.mean(1), changed)
    assert not torch.allclose(again[0], out[0]) and torch.allclose(again[1:], out[1:])
    # positions: the same patches in another order are another image
    swapped = x[:, [1, 0, 2, 3]]
    assert not torch.allclose(proj(swapped.mean(1), swapped), out)
    # a pooled dataset: the pooled embedding is the only patch
    pooled = Projector(48, 64, 2, hidden=32, kind="qformer", patches=1)
    assert pooled(torch.randn(5, 48)).shape == (5, 2, 64)
