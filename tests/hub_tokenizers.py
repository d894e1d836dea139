"""Tokenizers of the shapes real hub models ship, built in the test (never downloaded).

Each builder writes what a model's folder on the hub holds for its tokenizer: `tokenizer.json`, a
`tokenizer_config.json` naming the tokenizer class, the special tokens and the chat template, and a
`generation_config.json` with the ids generation stops at. The templates are the families' own (condensed where they
have long tool-use branches), so that `AutoTokenizer` and `apply_chat_template` read them as they read the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from .conftest import TEXT

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if "
    "loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
OLMO2_TEMPLATE = (  # OLMo 2 Instruct (Tulu 3)
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + "
    "message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + "
    "eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)
SMOLLM3_TEMPLATE = (  # SmolLM3, its thinking and tool branches left out: ChatML with a metadata system turn
    "{{- '<|im_start|>system\n' }}{{- '## Metadata\n\nReasoning Mode: /no_think\n\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

CORPUS = [TEXT, "[INST] Translate: the cat [/INST] le chat\n", "system user assistant model\n"]


def _train(backend: HFTokenizer, vocab_size: int, specials: list[str], alphabet: list[str]) -> HFTokenizer:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def _with_byte_tokens(backend: HFTokenizer, n_specials: int) -> HFTokenizer:
    """SentencePiece's layout: the special pieces, then the 256 byte pieces <0x00>..<0xFF>, then the learned ones."""
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    out = {tok: i for tok, i in ordered[:n_specials]}
    for b in range(256):
        out[f"<0x{b:02X}>"] = n_specials + b
    for tok, _ in ordered[n_specials:]:
        if tok not in out:
            out[tok] = len(out)
    data["model"]["vocab"] = out
    for added in data["added_tokens"]:
        added["id"] = out[added["content"]]
    return HFTokenizer.from_str(json.dumps(data))


def _sentencepiece(specials: list[str], dummy_prefix: bool, vocab_size: int = 400) -> HFTokenizer:
    """A Llama-2 / Mistral (dummy prefix) or Gemma (none) tokenizer.json: BPE over ▁-joined text, byte fallback."""
    backend = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("\u2581")] if dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # pieces stay within words, as spm's
    _train(backend, vocab_size, specials, [])
    backend = _with_byte_tokens(backend, len(specials))  # the saved pipeline has no pre-tokenizer, as Llama 2's
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if dummy_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *strip])
    return backend


def _bos_post_processor(backend: HFTokenizer, bos: str) -> None:
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, bos_id)])


def _write(path: Path, backend: HFTokenizer, config: dict, eos_ids: int | list[int], bos_id: int | None,
           pad_id: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_ids}
    if pad_id is not None:
        generation["pad_token_id"] = pad_id
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path


def llama2(path: Path, template: str = MISTRAL_TEMPLATE, tokenizer_class: str = "LlamaTokenizer") -> Path:
    """Llama 2 / Mistral v0.1: <unk> <s> </s>, SentencePiece BPE with a dummy prefix and byte fallback, BOS added."""
    backend = _sentencepiece(["<unk>", "<s>", "</s>"], dummy_prefix=True)
    _bos_post_processor(backend, "<s>")
    config = {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 1000000,
              "chat_template": template}
    return _write(path, backend, config, eos_ids=2, bos_id=1)


def gemma(path: Path) -> Path:
    """Gemma: <pad> <eos> <bos> <unk>, turn markers, no dummy prefix, byte fallback; BOS added; stops at
    <eos> and <end_of_turn>."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    backend = _sentencepiece(specials, dummy_prefix=False)
    _bos_post_processor(backend, "<bos>")
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
              "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA_TEMPLATE}
    return _write(path, backend, config, eos_ids=[1, 5], bos_id=2, pad_id=0)


def gemma3(path: Path) -> Path:
    """Gemma 3: Gemma's tokenizer shape; its template folds a system turn into the first user turn."""
    gemma(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEMMA3_TEMPLATE}, indent=2))
    return path


def phi3(path: Path) -> Path:
    """Phi-3-mini: Llama 2's SentencePiece shape with turn tokens; no BOS added; the instruct model's eos is
    <|endoftext|> and generation stops at <|end|> and <|assistant|> too."""
    backend = _sentencepiece(["<unk>", "<s>", "</s>"], dummy_prefix=True)
    names = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    ids = {n: backend.token_to_id(n) for n in names}
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "unk_token": "<unk>", "pad_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "chat_template": PHI3_TEMPLATE}
    return _write(path, backend, config, eos_ids=[ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"]],
                  bos_id=1, pad_id=ids["<|endoftext|>"])


def _byte_level(split: str, vocab_size: int = 400, ignore_merges: bool = False) -> HFTokenizer:
    backend = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return _train(backend, vocab_size, [], pre_tokenizers.ByteLevel.alphabet())


def llama3(path: Path) -> Path:
    """Llama 3: tiktoken-style byte-level BPE; <|begin_of_text|> added by the post-processor; the instruct
    model's eos is <|eot_id|> and generation stops at <|end_of_text|> too; a word that is in the vocabulary is one
    token whatever the merges say (`ignore_merges`, as Llama 3's tokenizer.json sets it)."""
    backend = _byte_level(LLAMA3_SPLIT, ignore_merges=True)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, backend.token_to_id(bos))])])
    ids = {n: backend.token_to_id(n) for n in names}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "model_max_length": 131072, "chat_template": LLAMA3_TEMPLATE,
              "model_input_names": ["input_ids", "attention_mask"]}
    return _write(path, backend, config, eos_ids=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
                  bos_id=ids["<|begin_of_text|>"])


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")


def qwen(path: Path) -> Path:
    """Qwen2.5: byte-level BPE, NFC, no BOS at all; ChatML turns end with <|im_end|>, the eos of the instruct
    model; padding is <|endoftext|>."""
    backend = _byte_level(QWEN_SPLIT)
    backend.normalizer = normalizers.NFC()
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    ids = {n: backend.token_to_id(n) for n in names}
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
              "model_max_length": 131072, "chat_template": CHATML_TEMPLATE}
    return _write(path, backend, config, eos_ids=[ids["<|im_end|>"], ids["<|endoftext|>"]], bos_id=None,
                  pad_id=ids["<|endoftext|>"])


def olmo2(path: Path) -> Path:
    """OLMo 2: GPT-2-class byte-level BPE (cl100k's split) whose <|endoftext|> is BOS and EOS, a <|pad|>; the
    template writes the BOS itself."""
    backend = _byte_level(LLAMA3_SPLIT)
    names = ["<|endoftext|>", "<|pad|>"]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    ids = {n: backend.token_to_id(n) for n in names}
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|pad|>", "add_prefix_space": False,
              "model_max_length": 4096, "chat_template": OLMO2_TEMPLATE}
    return _write(path, backend, config, eos_ids=ids["<|endoftext|>"], bos_id=ids["<|endoftext|>"],
                  pad_id=ids["<|pad|>"])


def smollm3(path: Path) -> Path:
    """SmolLM3: Llama 3's byte-level BPE without a BOS; ChatML turns end with <|im_end|>, its eos and pad."""
    backend = _byte_level(LLAMA3_SPLIT)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    ids = {n: backend.token_to_id(n) for n in names}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "model_max_length": 65536, "chat_template": SMOLLM3_TEMPLATE}
    return _write(path, backend, config, eos_ids=ids["<|im_end|>"], bos_id=None, pad_id=ids["<|im_end|>"])


def gpt2(path: Path, tokenizer) -> Path:
    """GPT-2: byte-level BPE whose only special token, <|endoftext|>, is BOS, EOS and UNK at once; no template."""
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": 1024}
    eos = backend.token_to_id("<|endoftext|>")
    return _write(path, backend, config, eos_ids=eos, bos_id=eos)


BUILDERS = {"llama2": llama2, "llama3": llama3, "gemma": gemma, "qwen": qwen, "gemma3": gemma3, "phi3": phi3,
            "olmo2": olmo2, "smollm3": smollm3}
