#!/usr/bin/env python3
"""Reference fixtures for ferrum's tokenizer tests (tests/tokenizer_*.rs).

Run with the project's Python env (transformers 5.x, gguf, sentencepiece, tokenizers, llama-cpp-python):

    /work/pyenv/bin/python scripts/make_tokenizer_fixtures.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes tests/fixtures/tokenizer/:
- smollm2_metadata.json   the GGUF's tokenizer.* metadata (typed, see `dump_metadata`), so the Rust test
                          needs neither the model file nor a GGUF parser;
- smollm2_reference.json  ids / decodes from transformers (`AutoTokenizer.from_pretrained(dir, gguf_file=..)`),
                          cross-checked against llama.cpp, and chat template renderings;
- spm_metadata.json       a `llama` (SentencePiece) vocabulary as GGUF metadata, from a tiny BPE model trained
                          here with `sentencepiece` (byte fallback <0x00>..<0xFF>, a user-defined token);
- spm_reference.json      ids from transformers' GGUF converter in its sentencepiece-faithful form (the
                          `Prepend("▁") + Replace(" ", "▁")` normalizer it uses for phi3, which is also what
                          Llama's own tokenizer.json and llama.cpp do), cross-checked against sentencepiece
                          itself on every text without added tokens. (transformers' default `llama` GGUF
                          converter uses `Metaspace(prepend_scheme="first")`, which drops the dummy prefix of
                          text that already starts with a space, unlike sentencepiece.)
- hf_tiny/                a tiny byte-level BPE tokenizer.json + tokenizer_config.json + generation_config.json;
- hf_tiny_reference.json  ids / decodes / chat rendering from transformers' AutoTokenizer on hf_tiny/;
- gpt2_slow/              a tiny GPT-2-style checkpoint tokenizer WITHOUT tokenizer.json: only vocab.json +
                          merges.txt + tokenizer_config.json + special_tokens_map.json, as GPT-2 / GPT-J ship;
- gpt2_slow_reference.json ids / decodes from transformers' AutoTokenizer on gpt2_slow/ (which builds the fast
                          tokenizer from vocab.json + merges.txt), for the directory as saved and for config
                          variants (add_prefix_space, add_bos_token/add_eos_token, added_tokens_decoder) that the
                          Rust test writes next to a copy of vocab.json + merges.txt. transformers 5 has no slow
                          Python GPT2Tokenizer any more, so every id list is also checked against an independent
                          Python transcription of OpenAI's GPT-2 `encoder.py` (`Gpt2ReferenceBpe` below).
Everything is deterministic (fixed corpus, single-threaded training).

    /work/pyenv/bin/python scripts/make_tokenizer_fixtures.py --only gpt2_slow   # no GGUF needed
"""

import argparse
import io
import json
import shutil
import os
import sys
import tempfile
from pathlib import Path

import gguf
import regex
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "tokenizer"
DEFAULT_GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM2_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, inner   runs and trailing   ",
    "numbers: 3.14159, 1,000,000 and 2024-11-25; x 123 abc456def",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "tabs\tand\r\nCRLF\n\n\nnewlines\n",
    "emoji 🚀🔥👍🏽 family 👨‍👩‍👧",
    "CJK 東京タワー 你好世界 한국어",
    "accents: café naïve Ångström Zürich façade",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos",
    "mixed <repo_name>foo<file_sep>bar<jupyter_code>",
    "",
    "x",
    "URL https://example.com/a?b=c&d=e#frag",
    "Ĳ ÿ\u00a0nbsp \u200b zero-width",
    "contractions: it's I'm you'll they've WE'RE",
]

SPM_CORPUS_LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a tokenizer splits text into pieces and maps each piece to an id",
    "sentencepiece treats the input as a raw stream and encodes spaces as a meta symbol",
    "byte fallback turns characters that are not in the vocabulary into utf-8 bytes",
    "hello world, hello tokenizer, hello there",
    "numbers like 12 and 345 appear in text too",
    "inference engines stream tokens one at a time to the client",
    "the server holds back partial characters until they are complete",
    "<tool> calls look like this <tool> and are matched whole",
]

SPM_TEXTS = [
    "hello world",
    "the quick brown fox",
    " leading space and  double space",
    "Capitalized Words Are Rare Here",
    "unknown chars: ü é 東京 🚀",
    "line one\nline two",
    "call <tool> now<tool>twice",
    "<s>not a control token in text</s>",
    "numbers 12345 and 67",
    "",
    "x",
    "tokenizer",
]

HF_TEXTS = [
    "hello world",
    "The tokenizer json path works.",
    "  spaces   and\nnewlines\n\n",
    "unicode: café 東京 🚀",
    "<|eos|> special in text <|bos|>",
    "",
]

LLAMA2_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = """{%- for message in messages %}
    {%- if loop.first and message.role != 'system' %}
{{- '<|bos|>system\\nDefault system prompt.' + '<|eos|>\\n' }}
    {%- endif %}
{{- '<|bos|>' + message.role + '\\n' + message.content | trim + '<|eos|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|bos|>assistant\\n' }}
{%- endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer with émojis 🗼"},
]


def write_json(name, obj):
    path = OUT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


# --- typed metadata dump ------------------------------------------------------------------------

_TYPE_NAMES = {
    gguf.GGUFValueType.UINT8: "u8",
    gguf.GGUFValueType.INT8: "i8",
    gguf.GGUFValueType.UINT16: "u16",
    gguf.GGUFValueType.INT16: "i16",
    gguf.GGUFValueType.UINT32: "u32",
    gguf.GGUFValueType.INT32: "i32",
    gguf.GGUFValueType.UINT64: "u64",
    gguf.GGUFValueType.INT64: "i64",
    gguf.GGUFValueType.FLOAT32: "f32",
    gguf.GGUFValueType.FLOAT64: "f64",
    gguf.GGUFValueType.BOOL: "bool",
    gguf.GGUFValueType.STRING: "string",
}


def dump_metadata(reader):
    """`{key: {"type": t, "value": v}}`, arrays as `{"type": "array", "item_type": t, "value": [..]}`.

    Only `general.architecture` and the `tokenizer.*` keys: that is all the tokenizer reads."""
    out = {}
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or key == "general.architecture"):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = {"type": "array", "item_type": _TYPE_NAMES[field.types[1]], "value": field.contents()}
        else:
            out[key] = {"type": _TYPE_NAMES[field.types[0]], "value": field.contents()}
    return out


# --- SmolLM2 (gpt2 byte-level BPE from GGUF) ---------------------------------------------------


def smollm2(gguf_path):
    reader = gguf.GGUFReader(str(gguf_path))
    write_json("smollm2_metadata.json", dump_metadata(reader))

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        import llama_cpp

        llama = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    except Exception as e:  # llama.cpp is only a cross-check
        print(f"llama.cpp cross-check unavailable: {e}")
        llama = None

    cases = []
    for text in SMOLLM2_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        if llama is not None:
            ref = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert ref == ids, f"transformers and llama.cpp disagree on {text!r}: {ids} vs {ref}"
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": tok.encode(text, add_special_tokens=True),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )

    chats = []
    for messages in (CONVERSATION[:3], CONVERSATION[1:3], CONVERSATION):
        for add_generation_prompt in (True, False):
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            chats.append({"messages": messages, "add_generation_prompt": add_generation_prompt, "rendered": rendered})

    write_json(
        "smollm2_reference.json",
        {
            "source": f"transformers AutoTokenizer.from_pretrained(gguf_file={gguf_path.name}); ids equal llama.cpp's",
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "vocab_size": len(tok),
            "cases": cases,
            "chats": chats,
        },
    )


# --- SentencePiece (`llama` GGUF vocabulary) ---------------------------------------------------


def spm_fixture():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS_LINES * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        user_defined_symbols=["<tool>"],
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]

    def token_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        if sp.is_unused(i):
            return 5
        if tokens[i] == "<tool>":
            return 4
        return 1

    types = [token_type(i) for i in range(n)]
    metadata = {
        "general.architecture": {"type": "string", "value": "llama"},
        "tokenizer.ggml.model": {"type": "string", "value": "llama"},
        "tokenizer.ggml.tokens": {"type": "array", "item_type": "string", "value": tokens},
        "tokenizer.ggml.scores": {"type": "array", "item_type": "f32", "value": scores},
        "tokenizer.ggml.token_type": {"type": "array", "item_type": "i32", "value": types},
        "tokenizer.ggml.bos_token_id": {"type": "u32", "value": sp.bos_id()},
        "tokenizer.ggml.eos_token_id": {"type": "u32", "value": sp.eos_id()},
        "tokenizer.ggml.unknown_token_id": {"type": "u32", "value": sp.unk_id()},
        "tokenizer.ggml.add_bos_token": {"type": "bool", "value": True},
        "tokenizer.ggml.add_eos_token": {"type": "bool", "value": False},
        "tokenizer.ggml.add_space_prefix": {"type": "bool", "value": True},
        "tokenizer.chat_template": {"type": "string", "value": LLAMA2_STYLE_TEMPLATE},
    }
    write_json("spm_metadata.json", metadata)

    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "unk_token_id": sp.unk_id(),
        "add_prefix_space": True,
    }
    backend, _ = convert_gguf_tokenizer("phi3", tokenizer_dict)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[sp.bos_id()],
        eos_token=tokens[sp.eos_id()],
        unk_token=tokens[sp.unk_id()],
        chat_template=LLAMA2_STYLE_TEMPLATE,
    )

    cases = []
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        sp_ids = sp.encode(text)
        # sentencepiece has no control tokens in text, and no dummy prefix after an added token.
        if "<s>" not in text and "<tool>" not in text:
            assert sp_ids == ids, f"transformers and sentencepiece disagree on {text!r}: {ids} vs {sp_ids}"
        cases.append(
            {
                "text": text,
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    byte_ids = [i for i, t in enumerate(types) if t == 6]
    assert len(byte_ids) == 256, len(byte_ids)
    chats = []
    for messages in (CONVERSATION[:3], CONVERSATION):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        chats.append({"messages": messages, "add_generation_prompt": False, "rendered": rendered})
    write_json(
        "spm_reference.json",
        {
            "source": "transformers convert_gguf_tokenizer('phi3', ..) (Prepend+Replace normalizer); "
            "ids equal sentencepiece's on texts without added tokens",
            "bos_token_id": sp.bos_id(),
            "eos_token_id": sp.eos_id(),
            "vocab_size": n,
            "cases": cases,
            "chats": chats,
        },
    )


# --- tokenizer.json directory ------------------------------------------------------------------


def hf_dir_fixture():
    out_dir = OUT / "hf_tiny"
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end_of_turn|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SPM_CORPUS_LINES * 10 + HF_TEXTS, trainer=trainer)
    bos_id = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": True,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos_ids = [tokenizer.token_to_id("<|eos|>"), tokenizer.token_to_id("<|end_of_turn|>")]
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}, indent=2) + "\n")
    print(f"wrote {out_dir}")

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    cases = []
    for text in HF_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": tok.encode(text, add_special_tokens=True),
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    chats = []
    for messages in (CONVERSATION[:3], CONVERSATION[1:]):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chats.append({"messages": messages, "add_generation_prompt": True, "rendered": rendered})
    write_json(
        "hf_tiny_reference.json",
        {
            "source": "transformers AutoTokenizer.from_pretrained(hf_tiny/)",
            "bos_token_id": bos_id,
            "eos_token_ids": eos_ids,
            "vocab_size": len(tok),
            "cases": cases,
            "chats": chats,
        },
    )


# --- GPT-2 slow-tokenizer files (vocab.json + merges.txt, no tokenizer.json) -------------------

GPT2_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog, and the dog doesn't mind.",
    "I'll be there at 10:30; we've got 2 hours, they're late and it's raining.",
    "Language models read tokens; a tokenizer turns text into ids and back again.",
    "Le café est très bon à Paris, où l'été est chaud. Ça va très bien, merci !",
    "Der Bär läuft über die Straße in Zürich, während es schneit.",
    "El niño comió una manzana y dijo: ¡qué rica está! ¿Y tú?",
    "東京は日本の首都です。東京タワーは有名です。",
    "你好世界，今天天气很好。我们一起去学习中文吧。",
    "한국어 문장도 조금 넣어 봅니다.",
    "Москва — столица России, а Киев — столица Украины.",
    "Emoji are bytes too: 🚀 🔥 👍🏽 😀 🎉",
    "def main():\n    print('hello, world')\n    return 0\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159",
    "He said \"don't\" and she said \"won't\", then they're gone.",
    "tabs\tseparate\tcolumns\tin\tthis\tline",
]

GPT2_TEXTS = [
    "Hello world",
    " Hello world",
    "  leading, multiple   spaces and trailing   ",
    "line one\nline two\n\n\nthree\n",
    "tabs\tand\t\ttabs\r\nCRLF",
    "digits 12345 and 3.14159 and 2024-11-25",
    "don't I'll we've they're it's DON'T She'd",
    "accents: café naïve Zürich Ångström façade",
    "CJK 東京タワー 你好世界 한국어",
    "emoji 🚀👍🏽 family 👨‍👩‍👧",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "text <|endoftext|> spaced <|endoftext|><|endoftext|>",
    "",
    "x",
    "tool call <tool> and <|pad|> literal",
    "Punctuation , . ! ? ' \" ( ) ... end .",
]

GPT2_BASE_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "model_max_length": 1024,
    "errors": "replace",
    # Many GPT-2-era configs say true; transformers 5 ignores it for BPE tokenizers.
    "clean_up_tokenization_spaces": True,
}
GPT2_SPECIAL_TOKENS_MAP = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}

# Variants: tokenizer_config.json (+ special_tokens_map.json, or none) written next to the same vocab/merges.
GPT2_VARIANTS = {
    "prefix_space_bos": {
        "tokenizer_config": {**GPT2_BASE_CONFIG, "add_prefix_space": True, "add_bos_token": True},
        "special_tokens_map": GPT2_SPECIAL_TOKENS_MAP,
    },
    "no_files_defaults": {"tokenizer_config": None, "special_tokens_map": None},
    "added_tokens_decoder": {
        "tokenizer_config": {
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": True,
            "add_eos_token": True,
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|pad|>",
            "extra_special_tokens": ["<|sep|>"],
            # ids are filled in by gpt2_slow_fixture() from the trained vocabulary size.
            "added_tokens_decoder": None,
        },
        "special_tokens_map": None,
    },
}


class Gpt2ReferenceBpe:
    """OpenAI's GPT-2 `encoder.py` algorithm (byte->unicode table, the GPT-2 split regex, greedy lowest-rank
    merges), written independently of `tokenizers`, plus the slow tokenizer's split on special tokens."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab, merges, specials, add_prefix_space=False):
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))
        self.encoder = vocab
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.specials = specials  # {content: id}
        self.add_prefix_space = add_prefix_space

    def bpe(self, token):
        word = list(token)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode_plain(self, text):
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        ids = []
        for piece in self.PAT.findall(text):
            spelled = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(spelled))
        return ids

    def encode(self, text):
        if not self.specials:
            return self.encode_plain(text)
        split = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")")
        ids = []
        for i, part in enumerate(split.split(text)):
            if i % 2 == 1:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.encode_plain(part))
        return ids


def _write_json_file(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _gpt2_cases(tok, reference_bpe, texts):
    cases = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        expected = reference_bpe.encode(text)
        assert ids == expected, f"transformers and the reference GPT-2 BPE disagree on {text!r}: {ids} vs {expected}"
        with_special = tok.encode(text, add_special_tokens=True)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": with_special,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
                "decoded_with_special": tok.decode(with_special, skip_special_tokens=False),
                "decoded_with_special_skip_special": tok.decode(with_special, skip_special_tokens=True),
            }
        )
    return cases


def gpt2_slow_fixture():
    out_dir = OUT / "gpt2_slow"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 360 + 1,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(GPT2_CORPUS_LINES * 10, trainer=trainer)
    model_json = json.loads(tokenizer.to_str())["model"]
    # GPT-2's layout: <|endoftext|> is the last entry of vocab.json; merges.txt has a #version header.
    vocab = dict(model_json["vocab"])
    vocab["<|endoftext|>"] = len(vocab)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model_json["merges"]]
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out_dir / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    _write_json_file(out_dir / "tokenizer_config.json", GPT2_BASE_CONFIG)
    _write_json_file(out_dir / "special_tokens_map.json", GPT2_SPECIAL_TOKENS_MAP)
    print(f"wrote {out_dir} ({len(vocab)} tokens, {len(merges)} merges)")

    eot_id = vocab["<|endoftext|>"]
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert type(tok).__name__ == "GPT2Tokenizer", type(tok)
    assert "<|pad|>" not in tok.get_vocab()
    base = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "cases": _gpt2_cases(tok, Gpt2ReferenceBpe(vocab, merges, {"<|endoftext|>": eot_id}), GPT2_TEXTS),
    }

    variants = {}
    for name, files in GPT2_VARIANTS.items():
        config = files["tokenizer_config"]
        if config is not None and "added_tokens_decoder" in config:
            n = len(vocab)
            config = {
                **config,
                "added_tokens_decoder": {
                    str(eot_id): {"content": "<|endoftext|>", "lstrip": False, "rstrip": False,
                                  "normalized": False, "single_word": False, "special": True},
                    str(n): {"content": "<|pad|>", "lstrip": False, "rstrip": False,
                             "normalized": False, "single_word": False, "special": True},
                    str(n + 1): {"content": "<|sep|>", "lstrip": False, "rstrip": False,
                                 "normalized": False, "single_word": False, "special": True},
                    str(n + 2): {"content": "<tool>", "lstrip": False, "rstrip": False,
                                 "normalized": False, "single_word": False, "special": False},
                },
            }
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copy(out_dir / "vocab.json", tmp / "vocab.json")
            shutil.copy(out_dir / "merges.txt", tmp / "merges.txt")
            if config is not None:
                _write_json_file(tmp / "tokenizer_config.json", config)
            if files["special_tokens_map"] is not None:
                _write_json_file(tmp / "special_tokens_map.json", files["special_tokens_map"])
            # Without a tokenizer_config.json naming the class, AutoTokenizer needs the model type.
            _write_json_file(tmp / "config.json", {"model_type": "gpt2"})
            vtok = AutoTokenizer.from_pretrained(str(tmp))
            assert type(vtok).__name__ == "GPT2Tokenizer", type(vtok)
            specials = {t: vtok.convert_tokens_to_ids(t) for t in vtok.get_added_vocab()}
            ref = Gpt2ReferenceBpe(vocab, merges, specials, add_prefix_space=bool((config or {}).get("add_prefix_space")))
            variants[name] = {
                "tokenizer_config": config,
                "special_tokens_map": files["special_tokens_map"],
                "vocab_size": len(vtok),
                "bos_token_id": vtok.bos_token_id,
                "eos_token_id": vtok.eos_token_id,
                "added_vocab": vtok.get_added_vocab(),
                "cases": _gpt2_cases(vtok, ref, GPT2_TEXTS),
            }
    write_json(
        "gpt2_slow_reference.json",
        {
            "source": "transformers AutoTokenizer.from_pretrained(gpt2_slow/) (GPT2Tokenizer built from vocab.json + "
            "merges.txt); ids equal an independent transcription of OpenAI's GPT-2 encoder.py",
            **base,
            "variants": variants,
        },
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf", nargs="?", help="SmolLM2-135M-Instruct.Q4_1.gguf (for the smollm2 fixtures)")
    parser.add_argument("--only", choices=["smollm2", "spm", "hf_tiny", "gpt2_slow"], help="make one fixture set")
    args = parser.parse_args()
    if args.only in (None, "smollm2"):
        gguf_path = Path(args.gguf) if args.gguf else Path(os.environ.get("FERRUM_SMOLLM2_GGUF", DEFAULT_GGUF))
        if not gguf_path.is_file():
            sys.exit(f"{gguf_path} not found: run ci/fetch_models.sh or pass the GGUF path")
        smollm2(gguf_path)
    if args.only in (None, "spm"):
        spm_fixture()
    if args.only in (None, "hf_tiny"):
        hf_dir_fixture()
    if args.only in (None, "gpt2_slow"):
        gpt2_slow_fixture()


if __name__ == "__main__":
    main()
