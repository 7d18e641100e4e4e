"""Finding and loading checkpoints: defaults, and errors that name what is wrong."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicake.model.config import ModelConfig
from minicake.model.loader import check_weight_files, load_model, resolve_model
from minicake.model.tokenizer import Tokenizer


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


def test_a_config_json_that_is_not_json_is_named(llama_copy):
    (llama_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(llama_copy, device="cpu")


@pytest.mark.parametrize("field, value, error", [
    ("hidden_size", '"64"', r"config\.json: 'hidden_size' must be a positive integer, got '64'"),
    ("rms_norm_eps", "NaN", r"config\.json: 'rms_norm_eps' must be a positive number, got nan"),
    ("num_key_value_heads", "3", r"config\.json: 4 attention heads do not split into 3 KV heads"),
    ("vocab_size", None, r"config\.json lacks the field 'vocab_size'"),
    ("eos_token_id", '"</s>"', r"config\.json: 'eos_token_id' must be a token id"),
])
def test_a_config_field_missing_or_of_the_wrong_type_is_named_with_its_file(llama_copy, field, value, error):
    config = json.loads((llama_copy / "config.json").read_text())
    config[field] = "VALUE"
    if value is None:
        del config[field]
    (llama_copy / "config.json").write_text(json.dumps(config).replace('"VALUE"', str(value)))
    with pytest.raises(ValueError, match=error):
        ModelConfig.from_dir(llama_copy)


def test_a_truncated_safetensors_file_is_named_from_its_header(llama_copy):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    for load in (check_weight_files, lambda path: load_model(path, device="cpu")):
        with pytest.raises(ValueError, match=r"model\.safetensors: truncated or not a safetensors file"):
            load(llama_copy)


def test_a_tokenizer_json_that_does_not_parse_is_named(llama_copy):
    (llama_copy / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizer"):
        Tokenizer.from_dir(llama_copy)


@pytest.mark.parametrize("cli", [["minicake.generate", "hello"], ["minicake.serve", "--port", "0"]])
def test_the_clis_end_on_a_bad_model_file_with_one_line_naming_it(llama_copy, cli):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    done = subprocess.run([sys.executable, "-m", *cli, "--model", str(llama_copy), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1:] == [
        f"error: {weights}: truncated or not a safetensors file (Error while deserializing header: "
        "incomplete metadata, file not fully covered)"]
    assert "Traceback" not in done.stderr


def test_an_unknown_name_says_what_a_model_can_be(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        resolve_model(str(tmp_path / "no-such-model"))


def test_an_unreachable_hub_id_says_to_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local directory"):
        resolve_model("HuggingFaceTB/no-such-model-for-minicake-tests")
