"""The frozen LM, the projector, the reconstruction head, and the two ways to run the LM."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.sources import SourceError, resolve_model

# Prompt layouts. question_first puts all text first, so its KV cache is computed once per
# question; what changes per example (image tokens, answer) comes last, so each item costs
# only k + len(answer) positions, but the LM reads the image already knowing the question.
FAST_PREFIX = "Question: {question}\nAnswer: "
# image_first (LLaVA's, the note's): a fixed text prefix (LLaVA's system prompt, in
# short), the image tokens, then the question and answer. The prefix is the same for
# every example, so its KV cache is computed once.
IMAGE_PREFIX = "Image:"
REFERENCE_TEXT = "\nQuestion: {question}\nAnswer: "


def _mlp2x_gelu(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class QFormerBlock(nn.Module):
    """Pre-norm self-attention over the queries, cross-attention to the patches, an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(width) for _ in range(3))
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = _mlp2x_gelu(width, 4 * width, width)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(q)
        q = q + self.self_attn(x, x, x, need_weights=False)[0]
        q = q + self.cross_attn(self.norm_cross(q), memory, memory, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class QFormer(nn.Module):
    """A small Q-Former (BLIP-2's bridge, without its text branch): ``k`` learned queries
    attend to the image's patch embeddings (plus a learned position per patch) and become
    the ``k`` LLM tokens."""

    def __init__(self, in_dim: int, lm_dim: int, k: int, width: int, layers: int, patches: int):
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if width % h == 0 and (width // h >= 16 or h == 1))
        self.inp = nn.Linear(in_dim, width)
        self.pos = nn.Parameter(torch.randn(patches, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(k, width) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, lm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        memory = self.inp(patches) + self.pos
        q = self.queries.expand(patches.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, memory)
        return self.out(self.norm(q))


class Projector(nn.Module):
    """Image embedding -> ``k`` LLM token embeddings.

    - ``mlp``: LLaVA's mlp2x_gelu (Linear, GELU, Linear).
    - ``mlp_residual``: the same, plus a linear path carrying the embedding itself.
    - ``moe``: ``experts`` mlp2x_gelu experts; a linear router picks the top 2 per
      embedding and mixes them by their renormalised softmax gates. ``aux_loss`` holds the
      last forward's load-balancing loss (Switch Transformer's E·Σ f_e·P_e over the top-2
      slots: 1 when the experts share the load evenly, E when one takes it all).
    - ``qformer``: :class:`QFormer` over the image's ``patches`` embeddings (one, the
      pooled embedding itself, for a dataset without patches).
    """

    def __init__(
        self,
        in_dim: int,
        lm_dim: int,
        k: int,
        hidden: int | None = None,
        kind: str = "mlp",
        experts: int = 4,
        layers: int = 2,
        patches: int = 1,
    ):
        super().__init__()
        self.k, self.lm_dim, self.kind = k, lm_dim, kind
        hidden = hidden or lm_dim
        out = k * lm_dim
        self.aux_loss: torch.Tensor | None = None
        if kind == "qformer":
            self.qformer = QFormer(in_dim, lm_dim, k, hidden, layers, patches)
        elif kind == "moe":
            self.router = nn.Linear(in_dim, experts)
            self.experts = nn.ModuleList(_mlp2x_gelu(in_dim, hidden, out) for _ in range(experts))
        else:
            self.net = _mlp2x_gelu(in_dim, hidden, out)
        if kind == "mlp_residual":
            self.skip = nn.Linear(in_dim, out)

    def forward(self, x: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the pooled embeddings ``[B, D]``; ``patches``: ``[B, P, D]`` when the
        dataset has them (only ``qformer`` reads them)."""
        if self.kind == "qformer":
            if patches is None:
                assert self.qformer.pos.shape[0] == 1, "a qformer built for patches needs them"
                patches = x[:, None]
            return self.qformer(patches)
        if self.kind == "moe":
            y = self._moe(x)
        else:
            y = self.net(x)
            if self.kind == "mlp_residual":
                y = y + self.skip(x)
        return y.view(x.shape[0], self.k, self.lm_dim)

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        top, idx = probs.topk(min(2, len(self.experts)), dim=-1)
        gates = (top / top.sum(-1, keepdim=True)).to(x.dtype)
        y = None
        for e, expert in enumerate(self.experts):
            weight = (gates * (idx == e)).sum(-1)  # 0 where e is not among the top 2
            rows = weight.nonzero().squeeze(-1)
            if len(rows) == 0:
                continue
            part = expert(x[rows]) * weight[rows, None]
            if y is None:
                y = torch.zeros(x.shape[0], part.shape[-1], dtype=part.dtype, device=x.device)
            y = y.index_add(0, rows, part)
        n = len(self.experts)
        routed = F.one_hot(idx, n).float().sum(1).mean(0) / idx.shape[-1]  # f_e
        self.aux_loss = n * (routed * probs.mean(0)).sum()
        return y


class ReconHead(nn.Module):
    """Maps the ``k`` projected tokens (concatenated) back to the image-embedding space."""

    def __init__(self, lm_dim: int, k: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        d = k * lm_dim
        if kind == "linear":
            self.net: nn.Module = nn.Linear(d, out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(d, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.flatten(1))


class LossBalance(nn.Module):
    """Weights on the two losses (``reg_balance``); λ multiplies the reg term on top.

    - ``none``: 1 and 1.
    - ``running_mean``: each loss divided by a stop-gradient running mean of itself
      (bias-corrected EMA, β = 0.99), so both enter at a scale of about 1.
    - ``uncertainty``: Kendall et al.'s learned weights ½·exp(−s) per loss, with ``s`` (the
      log variance) trained beside the projector through the ``+ ½·s`` term.
    """

    BETA = 0.99

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "running_mean":
            self.register_buffer("mean", torch.zeros(2))
            self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        elif kind == "uncertainty":
            self.log_var = nn.Parameter(torch.zeros(2))

    def weights(self, loss_lm: torch.Tensor, loss_reg: torch.Tensor) -> tuple[float, float]:
        """This step's weights (updating the running means first)."""
        if self.kind == "running_mean":
            with torch.no_grad():
                now = torch.stack([loss_lm.detach().float(), loss_reg.detach().float()])
                self.mean.mul_(self.BETA).add_(now, alpha=1 - self.BETA)
                self.updates += 1
                mean = self.mean / (1 - self.BETA ** self.updates.item())
            w = 1.0 / mean.clamp_min(1e-8)
            return w[0].item(), w[1].item()
        if self.kind == "uncertainty":
            w = 0.5 * torch.exp(-self.log_var.detach())
            return w[0].item(), w[1].item()
        return 1.0, 1.0

    def backward(self, loss_lm: torch.Tensor, loss_reg: torch.Tensor, lam: float) -> None:
        """Gradients for the learned weights: of Σ ½·exp(−s_i)·L_i + ½·s_i (reg term × λ)."""
        if self.kind != "uncertainty":
            return
        s = self.log_var
        losses = torch.stack([loss_lm.detach().float(), loss_reg.detach().float()])
        terms = 0.5 * torch.exp(-s) * losses + 0.5 * s
        (terms[0] + lam * terms[1]).backward()


def reg_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example ``1 - cos(recon, target)``, in [0, 2]."""
    return 1.0 - F.cosine_similarity(recon.float(), target.float(), dim=-1)


def load_lm(name: str, device: torch.device):
    """Load a frozen causal LM and its tokenizer from an alias, a local path or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one a user should see
    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"cannot load model {name!r}: {first}") from None
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise SourceError(
                f"model {name!r} ({config.model_type}) is not a causal language model"
            ) from None
        raise SourceError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise SourceError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise SourceError(f"model {name!r}: its tokenizer has no eos token to end answers with")
    lm.requires_grad_(False).eval().to(device)
    return lm, tok


@dataclass
class Batch:
    """One question group: ``B`` examples sharing a question (so they share a prefix)."""

    question: str
    embeddings: torch.Tensor  # [B, D], normalised (a patch dataset's: pooled)
    answer_ids: torch.Tensor  # [B, A], right-padded, each ends with eos
    answer_mask: torch.Tensor  # [B, A] bool
    answers: list[str]
    patches: torch.Tensor | None = None  # [B, P, D], normalised, for a patch dataset


def _cache_kw(lm, cache) -> dict:
    """transformers 5.2x renamed the decoder's ``past_key_values`` argument to ``cache``."""
    params = inspect.signature(lm.get_decoder().forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


class PromptCache:
    """Token ids per question, and (fast path) the frozen LM's KV cache of each prefix."""

    def __init__(self, lm, tok, device: torch.device):
        self.lm, self.tok, self.device = lm, tok, device
        self._ids: dict[str, torch.Tensor] = {}
        self._kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.embed = lm.get_input_embeddings()

    def ids(self, text: str) -> torch.Tensor:
        if text not in self._ids:
            ids = self.tok(text, add_special_tokens=False).input_ids
            self._ids[text] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self._ids[text]

    def answer_ids(self, answer: str) -> list[int]:
        # The prompt ends in a space, so answers are tokenised bare ("3", not " 3").
        return [*self.tok(answer, add_special_tokens=False).input_ids, self.tok.eos_token_id]

    def prefix_kv(self, text: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A text prefix's keys/values per layer, batch 1; computed once per text."""
        if text not in self._kv:
            from transformers import DynamicCache

            ids = self.ids(text)[None]
            cache = DynamicCache(config=self.lm.config)
            with torch.no_grad():
                self.lm.get_decoder()(input_ids=ids, use_cache=True, **_cache_kw(self.lm, cache))
            self._kv[text] = [(k, v) for k, v, *_ in cache]
        return self._kv[text]


def _after_prefix(lm, prompts: PromptCache, prefix: str, x: torch.Tensor, a: int) -> torch.Tensor:
    """Logits at the last ``a`` positions of ``x`` (embeddings), run after the cached
    ``prefix`` (its KV expanded to the batch, not copied)."""
    from transformers import DynamicCache

    b = x.shape[0]
    kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prompts.prefix_kv(prefix)]
    cache = DynamicCache(ddp_cache_data=kv, config=lm.config)
    decoder = lm.get_decoder()
    hidden = decoder(inputs_embeds=x, use_cache=True, **_cache_kw(lm, cache)).last_hidden_state
    return lm.get_output_embeddings()(hidden[:, -a:])


def answer_logits_fast(
    lm, prompts: PromptCache, batch: Batch, tokens: torch.Tensor
) -> torch.Tensor:
    """question_first: logits at the answer positions only, ``[B, A, V]``, with the
    question's KV cached.

    Sequence after the cached prefix: image tokens, then the answer tokens but the last.
    """
    answer_in = prompts.embed(batch.answer_ids[:, :-1])
    x = torch.cat([tokens.to(answer_in.dtype), answer_in], dim=1)
    prefix = FAST_PREFIX.format(question=batch.question)
    return _after_prefix(lm, prompts, prefix, x, batch.answer_ids.shape[1])


def answer_logits_image_first(
    lm, prompts: PromptCache, batch: Batch, tokens: torch.Tensor
) -> torch.Tensor:
    """image_first: after the cached fixed prefix, the image tokens, the question and the
    answer (the reference layout), with logits only at the answer positions, ``[B, A, V]``:
    the same numbers as :func:`answer_logits_reference` there, without the prefix's
    recomputation and the full-vocabulary projection of every other position."""
    x = _image_first_inputs(prompts, batch, tokens)
    return _after_prefix(lm, prompts, IMAGE_PREFIX, x, batch.answer_ids.shape[1])


def _image_first_inputs(prompts: PromptCache, batch: Batch, tokens: torch.Tensor):
    """Image tokens, question, answer (but its last token): what follows the prefix."""
    b = tokens.shape[0]
    text = prompts.embed(prompts.ids(REFERENCE_TEXT.format(question=batch.question)))
    answer_in = prompts.embed(batch.answer_ids[:, :-1])
    return torch.cat([tokens.to(text.dtype), text.expand(b, -1, -1), answer_in], dim=1)


def answer_logits_reference(
    lm, prompts: PromptCache, batch: Batch, tokens: torch.Tensor
) -> torch.Tensor:
    """Plain path, image first: the prefix, image tokens and whole text in one forward,
    logits at every position."""
    after = _image_first_inputs(prompts, batch, tokens)
    prefix = prompts.embed(prompts.ids(IMAGE_PREFIX))[None].expand(after.shape[0], -1, -1)
    x = torch.cat([prefix.to(after.dtype), after], dim=1)
    logits = lm(
        inputs_embeds=x, use_cache=False
    ).logits  # [B, T, V]: the full vocabulary everywhere
    a = batch.answer_ids.shape[1]
    return logits[:, -a:]


def answer_logits_for(lm_path: str, prompt_layout: str):
    """The LM forward a config asks for: the reference, or a fast path in its layout."""
    if lm_path == "reference":
        return answer_logits_reference
    return answer_logits_fast if prompt_layout == "question_first" else answer_logits_image_first


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the real (unpadded) answer tokens."""
    return F.cross_entropy(logits[batch.answer_mask].float(), batch.answer_ids[batch.answer_mask])


def exact_match(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per example: does greedy decoding produce exactly the answer and then stop?

    Greedy decoding reproduces the answer iff, with the answer's own prefix fed back,
    every next-token argmax equals the answer's next token (eos included); so one
    teacher-forced pass decides it without a generate loop.
    """
    hit = (logits.argmax(-1) == batch.answer_ids) | ~batch.answer_mask
    return hit.all(dim=1)
