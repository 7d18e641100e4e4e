"""Text in and out: the checkpoint's tokenizer, its chat template, incremental detokenization.

A thin wrapper over the `tokenizers` library reading tokenizer.json and tokenizer_config.json
(docs/design.md, Models and the bundled model). The chat template is rendered with jinja2 the way
transformers renders it. `IncrementalDetokenizer` turns a stream of generated token ids into
text deltas without ever emitting half of a multi-byte UTF-8 character.
"""
import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from minicake.model.config import read_json

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, chat_template: str | None,
                 extra_eos_ids: set[int], source: Path):
        self._tok, self.config, self.chat_template, self.source = tokenizer, config, chat_template, source
        self.bos_token_id = self._special_id("bos_token")
        self.pad_token_id = self._special_id("pad_token")
        eos_id = self._special_id("eos_token")
        self.eos_token_ids: set[int] = extra_eos_ids | ({eos_id} if eos_id is not None else set())
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: minicake reads fast tokenizers only")
        config_file = path / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        try:
            tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception that names no file
            raise ValueError(f"{tokenizer_file}: not a tokenizer the tokenizers library reads ({e})") from None
        return cls(tokenizer, config, _chat_template(path, config), _generation_eos_ids(path), path)

    def _special_id(self, name: str) -> int | None:
        token = self.config.get(name)
        if isinstance(token, dict):  # older configs store {"content": "<s>", ...}
            token = token["content"]
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; a BOS is prepended only if the checkpoint asks for one. Encode
        chat-templated text with add_special_tokens=False: the template writes its own BOS."""
        # encode_batch releases the GIL while it works (encode does not): a long prompt
        # tokenized in a worker thread does not stall the server's event loop
        ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError(f"the tokenizer in {self.source} has no chat template "
                             "(tokenizer_config.json 'chat_template' or chat_template.jinja); send a plain prompt")
        special = {name: self._special_text(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special)

    def encode_chat(self, messages: list[Message]) -> tuple[str, list[int]]:
        """A conversation through the chat template, the assistant's turn opened: its text and its
        token ids (the template writes the special tokens itself)."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        return text, self.encode(text, add_special_tokens=False)

    def _special_text(self, name: str) -> str | None:
        token = self.config.get(name)
        return token["content"] if isinstance(token, dict) else token


def _chat_template(path: Path, config: dict) -> str | None:
    """transformers >= 5 saves the template next to the config; older checkpoints inside it."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _generation_eos_ids(path: Path) -> set[int]:
    gen_file = path / "generation_config.json"
    eos = read_json(gen_file).get("eos_token_id") if gen_file.is_file() else None
    return set() if eos is None else set(eos if isinstance(eos, list) else [eos])


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """The jinja2 environment transformers renders chat templates in, compiled once per template
    (compiling took 1.6 of the 2.5 ms a 3 600-character chat took to template and tokenize)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class IncrementalDetokenizer:
    """Text deltas for generated tokens, fed one at a time.

    Each new token is decoded together with the tokens since the last emitted text (its
    "prefix window") and the delta is the difference of the two decodes: this keeps the
    leading space byte-level BPE puts on a token, and a token that ends in the middle of a
    UTF-8 character decodes to U+FFFD, so nothing is emitted until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this have had their text emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character, or a token with no text (a skipped special token)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """The text still held back when the stream ends: a last character cut off in the middle
        decodes to U+FFFD, as `decode` of all the ids gives it."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]
