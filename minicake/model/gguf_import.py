"""Converting a llama GGUF file into a Hugging Face layout directory (docs/design.md, Models and the bundled model).

The tensors are dequantized to fp32 with the `gguf` package and renamed to the Hugging Face
names; the Q and K projections get their rows un-permuted, per head, back from llama.cpp's
interleaved RoPE layout to the "rotate half" layout. The byte-level BPE vocabulary, merges,
special tokens and chat template in the metadata become tokenizer.json and
tokenizer_config.json, built with the `tokenizers` library.
"""
import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL_TOKEN = 3  # llama.cpp's token type of special tokens such as <|im_end|>


def metadata(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face llama counterpart")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of a Q or K weight: w: [n_heads * head_dim, hidden].

    Within each head llama.cpp stores the rows as pairs (0, d/2), (1, d/2 + 1), ... so that
    RoPE rotates neighbours; Hugging Face keeps the two halves apart."""
    head_dim = w.shape[0] // n_heads
    # [n_heads, head_dim/2, 2, ...] -> [n_heads, 2, head_dim/2, ...]
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader: GGUFReader, on_tensor=lambda name: None) -> dict[str, torch.Tensor]:
    """All tensors, dequantized to fp32, under their Hugging Face names and layout."""
    n_heads = metadata(reader, "llama.attention.head_count")
    n_kv_heads = metadata(reader, "llama.attention.head_count_kv", n_heads)
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if ".attn_q." in t.name:
            w = unpermute_rows(w, n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rows(w, n_kv_heads)
        # np.array copies: F32 tensors arrive as read-only views of the memory-mapped file
        tensors[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))
        on_tensor(t.name)
    return tensors


def hf_config(reader: GGUFReader) -> dict:
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not imported; minicake converts 'llama' GGUF files")

    def m(key, default=None):
        return metadata(reader, f"llama.{key}", default)
    tensor_names = {t.name for t in reader.tensors}
    heads = m("attention.head_count")
    ids = {k: metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m("vocab_size") or len(metadata(reader, "tokenizer.ggml.tokens")),
        "hidden_size": m("embedding_length"), "intermediate_size": m("feed_forward_length"),
        "num_hidden_layers": m("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": m("attention.head_count_kv", heads),
        "head_dim": m("rope.dimension_count", m("embedding_length") // heads),
        "rms_norm_eps": m("attention.layer_norm_rms_epsilon"),
        "rope_theta": m("rope.freq_base", 10000.0),
        "max_position_embeddings": m("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
    }


def byte_level_tokenizer(reader: GGUFReader) -> Tokenizer:
    """GPT-2 style byte-level BPE from `tokenizer.ggml.{tokens,merges,token_type}`."""
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r} is not imported; minicake converts byte-level BPE ('gpt2')")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    byte_char = _bytes_to_unicode()
    alphabet = set(byte_char)
    # tokens are stored in the byte alphabet, except a few that llama.cpp wrote as plain text
    vocab = {tok if set(tok) <= alphabet else "".join(byte_char[b] for b in tok.encode()): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata(reader, "tokenizer.ggml.token_type")
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                  for tok, kind in zip(tokens, types) if kind == CONTROL_TOKEN])
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tokenizer_config(reader: GGUFReader) -> dict:
    tokens = metadata(reader, "tokenizer.ggml.tokens")

    def token(key):
        token_id = metadata(reader, f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[token_id]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)),
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "chat_template": metadata(reader, "tokenizer.chat_template"),
        "model_max_length": metadata(reader, "llama.context_length"),
        "clean_up_tokenization_spaces": False,
    }


def convert_gguf(gguf_path: Path, out_dir: Path, on_tensor=lambda name: None) -> None:
    """Write config.json, generation_config.json, model.safetensors (fp32), tokenizer.json and
    tokenizer_config.json for `gguf_path` into `out_dir`; `on_tensor` is called per tensor."""
    reader = GGUFReader(str(gguf_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = hf_config(reader)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    byte_level_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2))
    save_file(read_tensors(reader, on_tensor), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def num_tensors(gguf_path: Path) -> int:
    return len(GGUFReader(str(gguf_path)).tensors)
