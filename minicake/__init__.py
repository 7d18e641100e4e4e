"""minicake: a small, readable rebuild of Mooncake's KVCache-centric, disaggregated LLM serving."""
