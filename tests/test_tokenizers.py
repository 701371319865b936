"""jlora.tokenizers: tiny vocabularies written in tmp_path, the error paths, and (`reference`, `assets`) token ids
equal to transformers' and to pure-Python reference implementations on a few hundred varied strings."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from jlora.assets import fetch
from jlora.tokenizers import bpe_from_vocab_merges, load_tokenizer, read_merges

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "!", "un", "##aff", "##able",
              "cafe", "中", "Hello"]


def write_bert(directory: Path, config: dict | None = None) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_wordpiece_from_a_tiny_vocab(tmp_path):
    tok = load_tokenizer(write_bert(tmp_path / "bert"))
    encoding = tok.encode("Hello WORLDS! unaffable Café 中x")
    assert encoding.tokens == ["[CLS]", "hello", "world", "##s", "!", "un", "##aff", "##able", "cafe", "中", "[UNK]",
                               "[SEP]"]
    assert encoding.ids == [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 1, 3]
    assert tok.encode("hello [MASK]", add_special_tokens=False).ids == [5, 4]  # special tokens stay whole
    assert tok.encode("hello", "world").type_ids == [0, 0, 0, 1, 1]
    assert tok.decode(tok.encode("worlds unaffable").ids) == "worlds unaffable"
    assert load_tokenizer(tmp_path / "bert" / "vocab.txt").encode("unaffable").ids == [2, 9, 10, 11, 3]
    cased = load_tokenizer(write_bert(tmp_path / "cased", {"do_lower_case": False}))
    assert cased.encode("Hello hello HELLO", add_special_tokens=False).ids == [14, 5, 1]


def byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


@pytest.mark.parametrize("names", [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")])
def test_byte_level_bpe_from_tiny_files(tmp_path, names):
    vocab, merges = byte_level_vocab()
    (tmp_path / names[0]).write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / names[1]).write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                     encoding="utf-8")
    assert read_merges(tmp_path / names[1]) == merges
    for tok in (load_tokenizer(tmp_path), load_tokenizer(tmp_path / names[0]), load_tokenizer(tmp_path / names[1])):
        encoding = tok.encode("hello world")
        assert encoding.tokens == ["hello", "Ġwor", "l", "d"]
        assert encoding.ids == [vocab[t] for t in encoding.tokens]
        assert tok.encode("héllo<|endoftext|>").tokens == ["h", "Ã", "©", "ll", "o", "<|endoftext|>"]
        assert tok.decode(tok.encode("héllo  wörld\n\t👍").ids) == "héllo  wörld\n\t👍"
        assert tok.encode("").ids == []


def test_bpe_from_vocab_merges_options():
    vocab, merges = byte_level_vocab()
    as_strings = bpe_from_vocab_merges(vocab, [f"{a} {b}" for a, b in merges])  # GGUF stores merges as strings
    assert as_strings.encode("hello world").ids == bpe_from_vocab_merges(vocab, merges).encode("hello world").ids
    assert bpe_from_vocab_merges(vocab, merges, add_prefix_space=True).encode("world").tokens == ["Ġwor", "l", "d"]
    assert bpe_from_vocab_merges(vocab, merges).encode("x 123").tokens == ["x", "Ġ", "1", "2", "3"]
    assert bpe_from_vocab_merges(vocab, merges, split_digits=True).encode("12").tokens == ["1", "2"]
    with pytest.raises(ValueError, match="merge 1"):
        bpe_from_vocab_merges(vocab, ["h e", "l l l"])


def test_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json, vocab\.txt, encoder\.json \+ vocab\.bpe"):
        load_tokenizer(tmp_path)
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="vocab.bpe is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\nnot a pair\n")
    with pytest.raises(ValueError, match="line 3"):
        load_tokenizer(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"model\.gguf is not a readable GGUF file"):
        load_tokenizer(tmp_path / "model.gguf")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "model.bin")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"no '\[UNK\]' token"):
        load_tokenizer(tmp_path / "bert")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "bad")


# ---- against transformers and pure-Python references, on the real vocabularies ----

FIXED = [
    "", " ", "   ", "\n", "\t", "Hello world!", "Hello world", " Hello world", "hello   world",
    "  leading and trailing  ", "tabs\tand\nnewlines\r\nand\rreturns", "line one\n\nline two\n", "\t\t indented",
    "a" * 101, "a" * 150, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "naïve café résumé Zürich Ångström", "e\u0301 and n\u0303 with combining marks", "日本語のテキストです。",
    "中文字符测试，你好！", "한국어 문장", "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "ελληνικά",
    "emoji 👍🏽🎉 family 👨\u200d👩\u200d👧 flags 🇫🇷", "3.14159 1,000,000 2024-01-01 0x1F", "12345678901234567890",
    "punctuation!!! ??? ... --- ;:,", "don't you'll we've I'm it's they'd", "UPPER lower MiXeD",
    "http://example.com/path?q=1&r=2#frag", "email@example.com", "[CLS] [SEP] [MASK] [UNK] [PAD]", "[mask] [Mask]",
    "<|endoftext|>", "text<|endoftext|>more", "\u00a0non-breaking\u2009thin\u3000ideographic",
    "zero\u200bwidth\ufeff", "ﬁ ligature ＦＵＬＬＷＩＤＴＨ ½ ²", "$100 & 50% off #hashtag @user", "C++ and C# and F#",
    "\x00null\x07bell\x1bescape", "replacement \ufffd char", "ü" * 40, "The quick brown fox jumps over the lazy dog.",
    "'quoted' \"double\" «guillemets»",
]
FRAGMENTS = ["the", "The", "cat", "LoRA", "low-rank", "adaptation", "jax", "Ünïcödé", "ß", "İstanbul", "東京", "👍",
             "🎉🎉", "123", "4.5", "!", "?!", "...", "(", ")", "[", "]", "'s", "n't", "—", "–", "tokenization",
             "unbelievable", "é", "e\u0301", "\u0301", "ñ", "x" * 30, "don't", "CAPS", "_", "__init__", "\\n", "0",
             "日本", "한", "ا", "ћ", "<|endoftext|>", "[MASK]", "@", "#", "😀", "\u200d", "ǅ", "Ⅻ"]
SEPARATORS = ["", " ", " ", " ", "  ", "\t", "\n", "\n\n", " \n ", "\r\n", "   \t"]


@pytest.fixture(scope="module")
def strings() -> list[str]:
    """The fixed strings and 250 random joins of fragments, the same on every run."""
    rng = np.random.default_rng(20240607)
    out = list(FIXED)
    for _ in range(250):
        n = int(rng.integers(1, 9))
        words = rng.choice(FRAGMENTS, size=n)
        seps = rng.choice(SEPARATORS, size=n + 1)
        out.append("".join(str(s) + str(w) for s, w in zip(seps, words)) + str(seps[-1]))
    return out


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """$JLORA_CACHE when set (reused across runs), else one folder for the whole session (shared with test_assets)."""
    return Path(os.environ.get("JLORA_CACHE") or tmp_path_factory.getbasetemp() / "jlora-cache")


def openai_gpt2_encode(text: str, encoder: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """OpenAI's gpt-2 encoder.py algorithm, as the reference the library must reproduce."""
    import regex

    byte_to_char = dict(zip(range(256), [chr(c) for c in range(256)]))
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    byte_to_char.update({b: chr(256 + i) for i, b in enumerate(extra)})
    ids = []
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    for piece in regex.findall(pattern, text):
        word = [byte_to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(encoder[token] for token in word)
    return ids


@pytest.mark.reference
@pytest.mark.assets
def test_gpt2_bpe_matches_transformers_and_openai(real_cache, tmp_path, strings):
    transformers = pytest.importorskip("transformers")
    data = fetch("gpt2-tokenizer", cache_dir=real_cache, progress=False)
    shutil.copy(data / "encoder.json", tmp_path / "vocab.json")  # the names transformers 5 looks for
    shutil.copy(data / "vocab.bpe", tmp_path / "merges.txt")
    theirs = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(data)
    assert ours.encode("Hello world!").ids == [15496, 995, 0]
    assert ours.get_vocab_size() == 50257
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    ranks = {pair: i for i, pair in enumerate(read_merges(data / "vocab.bpe"))}
    for text in strings:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], repr(text)
        if "<|endoftext|>" not in text:  # the reference knows no special tokens
            assert ids == openai_gpt2_encode(text, encoder, ranks), repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == text, repr(text)


@pytest.mark.reference
@pytest.mark.assets
def test_bert_wordpiece_matches_transformers(real_cache, strings):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    model = fetch("minilm", cache_dir=real_cache, progress=False)
    ours = load_tokenizer(model / "vocab.txt")  # WordPiece from vocab.txt, not the tokenizer.json beside it
    references = {"BertTokenizer": transformers.BertTokenizer(str(model / "vocab.txt")),
                  "BertTokenizerLegacy (pure Python)": BertTokenizerLegacy(str(model / "vocab.txt"))}
    from_json = load_tokenizer(model)  # the asset's tokenizer.json, padding to 128 turned off
    assert ours.encode("Hello world!").ids == [101, 7592, 2088, 999, 102]
    for text in strings:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special).ids
            for name, reference in references.items():
                assert ids == reference(text, add_special_tokens=special)["input_ids"], (name, special, repr(text))
            assert ids == from_json.encode(text, add_special_tokens=special).ids, ("tokenizer.json", repr(text))
