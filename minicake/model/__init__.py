"""The model: Llama-family decoder, checkpoint loading, GGUF import of the bundled model, tokenizer."""
from minicake.model.attention import AttentionMetadata
from minicake.model.config import ModelConfig
from minicake.model.llama import CausalLM
from minicake.model.loader import load_model, resolve_model
from minicake.model.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["AttentionMetadata", "CausalLM", "IncrementalDetokenizer", "ModelConfig", "Tokenizer",
           "load_model", "resolve_model"]
