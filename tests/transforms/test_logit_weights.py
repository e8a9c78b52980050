"""Logit weights of residual directions against the model's own final norm and head on a unit-RMS vector."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from actstore.transforms.logit_weights import logit_weights, top_tokens, unembedding
from tests.tiny_models import build_tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_logit_weights_equal_the_models_head_on_unit_rms_vectors(family: str, tmp_path) -> None:
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(family, tmp_path / family), dtype=torch.float32)
    with torch.no_grad():  # give the final norm a non-trivial gain so folding it in is tested
        model.model.norm.weight.copy_(torch.linspace(0.5, 1.5, model.config.hidden_size))
    d = model.config.hidden_size
    v = torch.randn(5, d, generator=torch.Generator().manual_seed(0))
    v = v / v.pow(2).mean(dim=-1, keepdim=True).sqrt()  # RMS 1: the norm's division is then (almost) the identity
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(v))
    got = logit_weights(v, unembedding(model))
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    top = top_tokens(v, unembedding(model), k=3, batch=2)
    assert torch.equal(top.positive_ids, expected.topk(3).indices)
    assert torch.equal(top.negative_ids, (-expected).topk(3).indices)
