"""Finding and loading checkpoints: defaults, and errors that name what is wrong."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicake.model.config import ModelConfig
from minicake.model.loader import load_model, resolve_model


@pytest.fixture
def llama_copy(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny llama checkpoint, to break."""
    return shutil.copytree(tiny_checkpoint("llama"), tmp_path / "llama")


def test_cpu_default_is_fp32_eval_mode_and_dtype_can_be_overridden(tiny_checkpoint):
    model = load_model(tiny_checkpoint("qwen2"), device="cpu")
    assert model.embed_tokens.weight.dtype == torch.float32 and not model.training
    assert load_model(tiny_checkpoint("qwen2"), device="cpu", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_config_reads_the_architecture_flags(tiny_checkpoint):
    llama, qwen2, qwen3 = (ModelConfig.from_dir(tiny_checkpoint(a)) for a in ("llama", "qwen2", "qwen3"))
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.tie_word_embeddings
    assert qwen2.attention_bias and not qwen2.tie_word_embeddings and qwen2.rope_scaling is None
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.num_key_value_heads == 2


def test_a_local_directory_resolves_to_itself(tiny_checkpoint):
    assert resolve_model(str(tiny_checkpoint("qwen3"))) == tiny_checkpoint("qwen3")


def test_a_directory_without_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, device="cpu")


def test_an_unsupported_architecture_is_named_with_its_file(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*config\.json"):
        load_model(llama_copy, device="cpu")


def test_rope_theta_and_rope_scaling_read_like_transformers_5_rope_parameters(llama_copy):
    """Most checkpoints spell RoPE as rope_theta + rope_scaling; transformers >= 5 writes rope_parameters."""
    expected = ModelConfig.from_dir(llama_copy)
    config = json.loads((llama_copy / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (llama_copy / "config.json").write_text(json.dumps(config))
    assert ModelConfig.from_dir(llama_copy) == expected


def test_an_unsupported_rope_type_is_named(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["rope_parameters"].update(rope_type="yarn")
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dir(llama_copy)


def test_a_missing_tensor_is_named(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(llama_copy, device="cpu")


def test_a_shape_mismatch_names_the_tensor_and_file(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*model\.safetensors.*\(63,\)"):
        load_model(llama_copy, device="cpu")


def test_a_missing_shard_is_named(tiny_checkpoint, tmp_path):
    sharded = shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "qwen2")
    (sharded / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00006.safetensors"):
        load_model(sharded, device="cpu")


def test_an_unknown_name_says_what_a_model_can_be(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        resolve_model(str(tmp_path / "no-such-model"))


def test_an_unreachable_hub_id_says_to_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local directory"):
        resolve_model("HuggingFaceTB/no-such-model-for-minicake-tests")
