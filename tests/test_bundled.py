"""The bundled smollm2-135m, converted from its GGUF by minicake, equals transformers loading
the same GGUF: tensor by tensor, and in 64-token greedy continuations."""
import pytest
import torch
from model_fixtures import greedy, hf_greedy
from safetensors.torch import load_file

from minicake.model.bundled import bundled_gguf_path
from minicake.model.loader import load_model
from minicake.model.tokenizer import Tokenizer

PLAIN = ["The capital of France is", "def fibonacci(n):"]
CHAT = [[{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "You answer in one short sentence."},
         {"role": "user", "content": "Why is the sky blue?"}]]


@pytest.fixture(scope="module")
def hf_gguf_model():
    """transformers' own dequantization and model, loaded once for this module."""
    from transformers import AutoModelForCausalLM
    gguf = bundled_gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(bundled_model_dir):
    return load_model(bundled_model_dir, device="cpu")


@pytest.fixture(scope="module")
def prompts(bundled_model_dir):
    tok = Tokenizer.from_dir(bundled_model_dir)
    chat = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False) for m in CHAT]
    return [tok.encode(p) for p in PLAIN] + chat


def test_converted_config_is_smollm2_135m(model):
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (30, 576, 9, 3, 64, 49152, 100000.0, True)
    assert c.eos_token_ids == {2}  # <|im_end|>


def test_every_converted_tensor_equals_transformers_dequantized_tensor(bundled_model_dir, hf_gguf_model):
    ours = load_file(bundled_model_dir / "model.safetensors")
    theirs = hf_gguf_model.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # the head is tied to the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, theirs[name]), name


def test_greedy_64_tokens_equal_transformers_on_plain_and_chat_prompts(model, hf_gguf_model, prompts):
    tokens, _, _ = greedy(model, prompts, num_tokens=64, block_size=16)  # all prompts in one batch
    for prompt, out in zip(prompts, tokens):
        assert out == hf_greedy(hf_gguf_model, prompt, 64)


def test_the_converted_model_knows_a_fact(model, bundled_model_dir, prompts):
    """Both implementations could share a wrong Q/K un-permutation; sensible text could not."""
    tok = Tokenizer.from_dir(bundled_model_dir)
    tokens, _, _ = greedy(model, prompts[:1], num_tokens=8, block_size=16)
    assert "Paris" in tok.decode(tokens[0])
