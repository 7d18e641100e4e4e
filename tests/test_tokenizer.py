"""The tokenizer minicake builds from the bundled GGUF encodes, decodes and templates exactly
like transformers' tokenizer for the same GGUF; incremental detokenization never splits a
character."""
import pytest

from minicake.model.bundled import bundled_gguf_path
from minicake.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world", " leading space", "trailing space ", "naïve café déjà vu, Straße, ØÆÅ",
    "emoji 🙂🚀 and a family 👨‍👩‍👧 and flags 🇫🇷", "中文字符和日本語のテキスト, 한국어", "مرحبا بالعالم",
    "def f(x):\n\treturn x ** 2  # square\n", "    indented\n\n\n\nlines   with    runs\t\t of  whitespace",
    "numbers 1234567890 3.14159 -42", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "special tokens mid<|endoftext|>text", "e\u0301 combining accent", "",
]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke 😀"}],
]


@pytest.fixture(scope="module")
def tokenizers(bundled_model_dir):
    from transformers import AutoTokenizer
    gguf = bundled_gguf_path()
    return Tokenizer.from_dir(bundled_model_dir), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_transformers_for_the_gguf(tokenizers, text):
    ours, theirs = tokenizers
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tokenizers, messages, add_generation_prompt):
    ours, theirs = tokenizers
    assert ours.apply_chat_template(messages, add_generation_prompt) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_bundled_special_tokens(tokenizers):
    ours, _ = tokenizers
    assert ours.eos_token_ids == {2} and ours.pad_token_id == 2 and ours.bos_token_id == 1
    assert ours.encode("Hi")[0] != ours.bos_token_id  # SmolLM2 asks for no BOS


def test_bos_is_added_only_when_the_checkpoint_asks(tiny_checkpoint):
    llama, qwen2 = Tokenizer.from_dir(tiny_checkpoint("llama")), Tokenizer.from_dir(tiny_checkpoint("qwen2"))
    assert llama.encode("fox")[0] == llama.bos_token_id and llama.encode("fox", add_special_tokens=False)[0] != 0
    assert qwen2.bos_token_id is None and qwen2.encode("fox") == qwen2.encode("fox", add_special_tokens=False)


# what real templates use: namespace, loop controls, tojson, raise_exception, whitespace control
TEMPLATE = """{%- set ns = namespace(system=none) %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}
<|im_start|>{{ m.role }}
{{ m.content | trim }}
{% if ns.system %}(system: {{ ns.system | tojson }})
{% endif %}
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_chat_template_jinja_file_renders_like_transformers(tiny_checkpoint, tmp_path):
    import shutil

    from transformers import AutoTokenizer
    path = shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "qwen2")
    (path / "chat_template.jinja").write_text(TEMPLATE)  # takes precedence over tokenizer_config.json
    ours, theirs = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "{}"}])


def test_a_checkpoint_without_chat_template_says_so(tiny_checkpoint, tmp_path):
    import json
    import shutil
    path = shutil.copytree(tiny_checkpoint("qwen3"), tmp_path / "qwen3")
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(path)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_adds_up_to_decode_without_broken_characters(tokenizers, text):
    ours, _ = tokenizers
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == ours.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_over_tokens_is_emitted_once_complete(tokenizers):
    ours, _ = tokenizers
    ids = ours.encode("a🚀")
    assert len(ids) > 2  # the rocket's four UTF-8 bytes take more than one token
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.add(i) for i in ids]
    assert deltas[0] == "a" and deltas[-1] == "🚀" and set(deltas[1:-1]) == {""}


def test_a_stream_cut_inside_a_character_flushes_what_decode_gives(tokenizers):
    ours, _ = tokenizers
    ids = ours.encode("a🚀")[:-1]  # max_tokens ends the stream before the rocket's last byte
    detok = IncrementalDetokenizer(ours)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == ours.decode(ids) and text.endswith("\ufffd")
    assert detok.flush() == ""
