"""Tiny random-weight causal LMs of many HF families, saved with a tokenizer so they load "by local directory".

Tests need real HF architectures (the site mapping depends on each family's module layout) but cannot
download checkpoints, so each family is built from a config small enough to run in milliseconds on a CPU.
"""

from functools import cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from actstore.schemas.model import ModelConfig
from actstore.transforms.models import embedded_default_gguf, load_model

N_LAYERS = 3
D_MODEL = 32
SEED = 0

_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders find features in the residual stream of a transformer.",
    "Activations are written to Zarr arrays and features to Parquet tables.",
    "Hello world! 0123456789, a b c d e f g h i j k l m n o p q r s t u v w x y z.",
]

_DECODER = {
    "hidden_size": D_MODEL,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "head_dim": 8,
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _DECODER,
    "mistral": {**_DECODER, "sliding_window": 4},
    "qwen2": _DECODER,
    "gemma": _DECODER,
    "gemma2": {**_DECODER, "sliding_window": 4, "query_pre_attn_scalar": 8},
    "gpt2": {"n_embd": D_MODEL, "n_layer": N_LAYERS, "n_head": 4, "n_positions": 64},
    "gpt_neox": {**_DECODER, "rotary_pct": 0.5, "use_parallel_residual": True},
    # Families beyond the required seven that share one of the mapped layouts.
    "gpt_neox_sequential": {**_DECODER, "rotary_pct": 0.5, "use_parallel_residual": False},
    "mixtral": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_DECODER, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 16},
    "qwen3": _DECODER,
    "qwen3_moe": {**_DECODER, **_MOE, "num_experts": 4},
    "phi3": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "gemma3_text": {**_DECODER, "sliding_window": 4, "query_pre_attn_scalar": 8},
    "starcoder2": _DECODER,
    "gptj": {"n_embd": D_MODEL, "n_layer": N_LAYERS, "n_head": 4, "n_positions": 64, "rotary_dim": 4},
    # Families without an attention/MLP mapping: Granite scales each branch before adding it to the stream;
    # Mamba has no attention and keeps its layers where only a search finds them.
    "granite": {**_DECODER, "residual_multiplier": 0.5},
    "mamba": {"hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS, "state_size": 4, "expand": 2, "conv_kernel": 2},
}
"""Config overrides per family; the key is the family name used by tests (mostly the HF `model_type`)."""

REQUIRED_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2", "gpt_neox")
"""The families the project promises; the others are checked too, more lightly."""


def model_type(family: str) -> str:
    """HF `model_type` of a test family (variants of one architecture share it)."""
    return "gpt_neox" if family.startswith("gpt_neox") else family


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, so any text encodes without unknown tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_model(family: str, directory: Path, seed: int = SEED) -> Path:
    """Build a seeded fp32 random-weight model of `family`, save it with the tokenizer to `directory`."""
    tokenizer = tiny_tokenizer()
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = AutoConfig.for_model(
        model_type(family),
        vocab_size=len(tokenizer),
        pad_token_id=special,
        bos_token_id=special,
        eos_token_id=special,
        tie_word_embeddings=False,
        **FAMILY_CONFIGS[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Default initialisation (std 0.02, norms at identity) makes every layer a near no-op; larger weights make
    # each site's values distinct, so a wrong mapping cannot pass by accident.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
            elif "norm" in name or "ln" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    return directory


@cache
def embedded_model() -> PreTrainedModel:
    """The embedded SmolLM2-135M on CPU, loaded by its .gguf file path once per test process (~15 s)."""
    return load_model(ModelConfig(name=str(embedded_default_gguf())), torch.device("cpu"))
