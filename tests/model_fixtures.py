"""Builders behind the model fixtures of conftest.py, and a tiny paged greedy loop.

`build_tiny_checkpoint` saves a small random transformers model of one architecture with a
small trained byte-level BPE tokenizer and a ChatML template. `PagedCache` + `greedy` drive
`CausalLM` over the flat batch layout the engine uses, with a cache allocated right here.
"""
import json
import math

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
          "Paged attention keeps the KV cache in fixed-size blocks.", "Prefill and decode run apart.",
          "naïve café, 東京, emoji 🙂 and numbers 1234567890"] * 20
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5)
ARCHS = {
    # Llama with tied embeddings, Llama 3.x's scaled RoPE, and a BOS the tokenizer must add
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    # Qwen2: q/k/v biases, untied output head, weights saved in several shards
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    # Qwen3: per-head q/k RMSNorm, a head_dim that is not hidden_size / num_heads
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, rope_theta=1000000.0, head_dim=32)),
}


def build_tiny_checkpoint(arch: str, out_dir) -> None:
    import transformers
    config_class, extra = ARCHS[arch]
    config = getattr(transformers, config_class)(**TINY, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the default init leaves biases at 0 and norms at 1: randomize all
        for name, p in model.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in name else torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, max_shard_size="100KB" if arch == "qwen2" else "1GB")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    bos = arch == "llama"
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bos, "bos_token": "<|endoftext|>" if bos else None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))


class PagedCache:
    """A paged KV cache for a few sequences; sequence s owns blocks s, s + num_seqs, ... so
    that its blocks are not contiguous and the block table really matters."""

    def __init__(self, config, num_seqs: int, max_len: int, block_size: int, dtype=torch.float32):
        blocks_per_seq = math.ceil(max_len / block_size)
        num_blocks = num_seqs * blocks_per_seq
        self.block_size = block_size
        self.block_tables = torch.arange(num_blocks, dtype=torch.int32).view(blocks_per_seq, num_seqs).T.contiguous()
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                          for _ in range(config.num_hidden_layers)]

    def forward(self, model, chunks: list[tuple[int, int, list[int]]]) -> list[torch.Tensor]:
        """Run one step over `chunks` (sequence index, position of the first token, token ids);
        sequences not in `chunks` sit this step out. Returns each chunk's logits [len, vocab]."""
        from minicake.model.attention import AttentionMetadata
        seqs = [s for s, _, _ in chunks]
        positions = torch.cat([torch.arange(start, start + len(ids)) for _, start, ids in chunks])
        seq_of_token = torch.cat([torch.full((len(ids),), s) for s, _, ids in chunks])
        blocks = self.block_tables[seq_of_token, positions // self.block_size].long()
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0] + [len(ids) for _, _, ids in chunks]).cumsum(0).int(),
            context_lens=torch.tensor([start + len(ids) for _, start, ids in chunks], dtype=torch.int32),
            block_tables=self.block_tables[seqs],
            slot_mapping=blocks * self.block_size + positions % self.block_size,
        )
        input_ids = torch.tensor([t for _, _, ids in chunks for t in ids])
        with torch.no_grad():
            logits = model.compute_logits(model(input_ids, positions, meta, self.kv_caches))
        return list(logits.split([len(ids) for _, _, ids in chunks]))


def greedy(model, prompts: list[list[int]], num_tokens: int, block_size: int = 4):
    """Batched greedy decoding through CausalLM: one prefill step for all prompts, then one
    token per sequence per step. Returns (tokens per prompt, logits of every generated token
    per prompt: [num_tokens, vocab], prompt logits per prompt: [len, vocab])."""
    cache = PagedCache(model.config, len(prompts), max(map(len, prompts)) + num_tokens, block_size)
    prompt_logits = cache.forward(model, [(s, 0, p) for s, p in enumerate(prompts)])
    step_logits = [[lg[-1]] for lg in prompt_logits]
    tokens = [[int(lg[-1].argmax())] for lg in prompt_logits]
    for step in range(num_tokens - 1):
        chunks = [(s, len(p) + step, [tokens[s][-1]]) for s, p in enumerate(prompts)]
        for s, lg in enumerate(cache.forward(model, chunks)):
            step_logits[s].append(lg[-1])
            tokens[s].append(int(lg[-1].argmax()))
    return tokens, [torch.stack(lg) for lg in step_logits], prompt_logits


def hf_greedy(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' own incremental greedy decoding (its KV cache), never stopping at EOS."""
    ids, cache, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(num_tokens):
            result = hf_model(ids, cache=cache, use_cache=True)
            cache, token = result.cache, int(result.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out
