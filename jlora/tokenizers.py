"""Tokenizers for jlora's models, built with the `tokenizers` library from the files a checkpoint ships.

    tok = load_tokenizer(jlora.assets.fetch("minilm"))          # tokenizer.json
    tok = load_tokenizer("path/to/vocab.txt")                   # BERT WordPiece
    tok = load_tokenizer(jlora.assets.fetch("gpt2-tokenizer"))  # GPT-2 byte-level BPE: encoder.json + vocab.bpe
    tok.encode("Hello world!").ids                              # [15496, 995, 0]

The pipelines are those of Hugging Face's `BertTokenizerFast` and `GPT2TokenizerFast`, so ids equal transformers'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

# What `load_tokenizer` looks for in a directory, in this order of preference.
LOOKED_FOR = ("tokenizer.json", "vocab.txt", "encoder.json + vocab.bpe", "vocab.json + merges.txt")
BERT_SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
GPT2_SPECIAL = ("<|endoftext|>",)
BPE_PAIRS = {"encoder.json": "vocab.bpe", "vocab.json": "merges.txt"}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a checkpoint directory or one of its tokenizer files.

    A directory is searched for, in order: `tokenizer.json`; `vocab.txt` (BERT WordPiece, with `do_lower_case`,
    `strip_accents` and `tokenize_chinese_chars` from `tokenizer_config.json` when present); `encoder.json` +
    `vocab.bpe` (OpenAI's GPT-2 files) or `vocab.json` + `merges.txt` (GPT-2 byte-level BPE). A file path picks that
    format (its companion file must sit beside it); a `.gguf` file gives the byte-level BPE stored inside it.

    Args:
        path: str | PathLike, a directory, or a `tokenizer.json`, `vocab.txt`, `encoder.json`, `vocab.bpe`,
            `vocab.json`, `merges.txt` or `.gguf` file.

    Returns:
        Tokenizer: BERT adds `[CLS] ... [SEP]` (pass `add_special_tokens=False` to `encode` to leave them out); GPT-2
        adds nothing. Padding and truncation that a tokenizer.json carries are turned off, so every format encodes a
        text to all its tokens; turn them on with `enable_padding` / `enable_truncation`.

    Raises:
        FileNotFoundError: no such path, or none of the files above (the message lists what was looked for).
        ValueError: a file that is not one of the names above, or a malformed vocabulary / merges file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_file():
        name, directory = path.name, path.parent
        if name == "tokenizer.json":
            return _from_json(path)
        if name == "vocab.txt":
            return wordpiece_from_vocab_file(path)
        if path.suffix == ".gguf":
            from jlora.models.gguf import read_tokenizer

            return read_tokenizer(path)
        vocab_name = {v: k for k, v in BPE_PAIRS.items()}.get(name, name)
        if vocab_name in BPE_PAIRS:
            return _bpe_from_pair(directory, vocab_name)
        raise ValueError(f"{path}: not a tokenizer file jlora reads; pass one of tokenizer.json, vocab.txt, "
                         f"encoder.json, vocab.bpe, vocab.json, merges.txt, or their directory (a GGUF file carries "
                         f"its own tokenizer: see jlora.models.gguf)")
    if (path / "tokenizer.json").is_file():
        return _from_json(path / "tokenizer.json")
    if (path / "vocab.txt").is_file():
        return wordpiece_from_vocab_file(path / "vocab.txt")
    for vocab_name in BPE_PAIRS:
        if (path / vocab_name).is_file():
            return _bpe_from_pair(path, vocab_name)
    raise FileNotFoundError(f"{path} holds no tokenizer: looked for {', '.join(LOOKED_FOR)}; pass the directory of a "
                            f"checkpoint that has one of them")


def wordpiece_from_vocab_file(vocab_file: str | os.PathLike, *, lowercase: bool | None = None) -> Tokenizer:
    """BERT's WordPiece tokenizer (as `BertTokenizerFast`) from a `vocab.txt`, one token a line, id = line number.

    Args:
        vocab_file: str | PathLike, the vocabulary.
        lowercase: bool | None, lowercase (and strip accents) the input; None reads `do_lower_case` from a
            `tokenizer_config.json` beside the file, default True.

    Raises:
        ValueError: the vocabulary has no `[UNK]` (or the configured unk token).
    """
    vocab_file = Path(vocab_file)
    config = _read_json(vocab_file.parent / "tokenizer_config.json") or {}
    special = {key: _token_text(config.get(key)) or default for key, default in BERT_SPECIAL.items()}
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    vocab = {token: index for index, token in enumerate(lines)}  # a repeated line keeps its last id, as transformers
    if special["unk_token"] not in vocab:
        raise ValueError(f"{vocab_file} has no {special['unk_token']!r} token; a WordPiece vocabulary needs one for "
                         f"unknown words (add it as a line, or set unk_token in tokenizer_config.json)")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=special["unk_token"], continuing_subword_prefix="##",
                                    max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True) if lowercase is None else lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([token for token in special.values() if token in vocab])
    cls, sep = special["cls_token"], special["sep_token"]
    if cls in vocab and sep in vocab:  # a vocabulary without them gets no template
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return tokenizer


def bpe_from_vocab_merges(vocab: dict[str, int], merges: Sequence[tuple[str, str]] | Sequence[str], *,
                          add_prefix_space: bool = False, split_digits: bool = False,
                          special_tokens: Sequence[str] = GPT2_SPECIAL) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer (as `GPT2TokenizerFast`) from a vocabulary and its merges.

    Args:
        vocab: dict[str, int], byte-level token (`Ġthe`) -> id.
        merges: list of pairs `("Ġ", "t")` or of strings `"Ġ t"`, highest priority first.
        add_prefix_space: bool, treat the first word as if a space preceded it (GPT-2: False).
        split_digits: bool, split every digit into its own pre-token before the byte-level split (SmolLM2 /
            llama.cpp's `smollm` pre-tokenizer: True).
        special_tokens: tokens kept whole when they occur in the text (`<|endoftext|>`); those absent from the
            vocabulary are skipped.

    Returns:
        Tokenizer: ByteLevel pre-tokenizer (GPT-2's regex) and decoder; adds no special tokens when encoding.

    Raises:
        ValueError: a merge that is not two tokens.
    """
    pairs = []
    for index, merge in enumerate(merges):
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2:
            raise ValueError(f"merge {index} is {merge!r}; each merge must be two tokens, 'a b' or ('a', 'b')")
        pairs.append(pair)
    tokenizer = Tokenizer(BPE(vocab, pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    tokenizer.add_special_tokens([token for token in special_tokens if token in vocab])
    return tokenizer


def read_merges(merges_file: str | os.PathLike) -> list[tuple[str, str]]:
    """The merges of a `vocab.bpe` / `merges.txt`: one `a b` pair a line after an optional `#version` header."""
    merges_file = Path(merges_file)
    merges = []
    for number, line in enumerate(merges_file.read_text(encoding="utf-8").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{merges_file}, line {number}: {line!r} is not two tokens separated by one space; "
                             f"pass the vocab.bpe / merges.txt that belongs to the vocabulary")
        merges.append((pair[0], pair[1]))
    return merges


def _from_json(file: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{file} is not a tokenizer.json the tokenizers library reads ({e}); replace it with the "
                         f"checkpoint's own file, or delete it to use vocab.txt / vocab.json + merges.txt") from e
    tokenizer.no_padding()  # e.g. sentence-transformers' MiniLM pads every text to 128 tokens
    tokenizer.no_truncation()
    return tokenizer


def _bpe_from_pair(directory: Path, vocab_name: str) -> Tokenizer:
    vocab_file, merges_file = directory / vocab_name, directory / BPE_PAIRS[vocab_name]
    for file in (vocab_file, merges_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; a byte-level BPE tokenizer needs {vocab_file.name} and "
                                    f"{merges_file.name} side by side")
    vocab = _read_json(vocab_file)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{vocab_file} is not a JSON object of token -> integer id")
    return bpe_from_vocab_merges(vocab, read_merges(merges_file))


def _read_json(file: Path):
    """The parsed JSON of `file`, or None if it does not exist."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); replace it with the file from the checkpoint") from e


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None
