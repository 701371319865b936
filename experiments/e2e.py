"""The E2E NLG challenge for experiments.nlg: its files, the loralib encoding, the prompt buckets and the metrics.

    train, test = e2e.load("path/to/e2e")                # trainset.csv + testset_w_refs.csv, or train.txt + test.txt
    groups = e2e.group(test)                             # [(mr, (ref, ref, ...)), ...], first-seen order
    texts, _ = e2e.beam_decode(step, model.init_cache, tok, [mr for mr, _ in groups], batch=8, max_new_tokens=64)
    arrays = e2e.encode(tok, train, max_len=512)         # ids, targets, mask: (n, 512)
    scores = e2e.metrics(hypotheses, [refs for _, refs in groups])

Files: the challenge's CSVs (columns `mr`, `ref`; one row per reference) or loralib's examples/NLG txts (`<mr>||<ref>`
a line). Encoding as loralib's gpt2_encode.py and FT_Dataset: context = the MR's tokens + the EOS id as separator
(its `--add_bos`, id 50256 for GPT-2); completion = the tokens of " " + ref, then EOS (`--add_eos`); the model reads
context + completion and the loss falls on the completion's tokens and its EOS only (never on the context).

Metrics, on lowercased text: BLEU by sacrebleu (corpus_bleu, 13a tokens, all references of an MR), NIST by nltk
(corpus_nist, n = 5), ROUGE-L by rouge-score (F1 of the LCS, the max over an MR's references, averaged), CIDEr by
pycocoevalcap (coco-caption's CIDEr-D, pure Python; fed our own lowercased tokens, not its Java PTB tokenizer).
METEOR is left out: nltk's needs the WordNet data, which is not reachable offline. The numbers are close to, not
identical with, the challenge's e2e-metrics script (mteval BLEU/NIST, Java tokenisation, ROUGE-L with beta 1.2).
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from jlora.models import generate

FILES = {"train": ("trainset.csv", "train.txt"), "test": ("testset_w_refs.csv", "test.txt")}
EOS = "<|endoftext|>"  # GPT-2's only special token: separator, end of text and padding
Pair = tuple[str, str]  # (meaning representation, one human reference)
PAPER = dict(bleu=70.4, nist=8.85, meteor=46.8, rouge_l=71.8, cider=2.53)  # GPT-2 M + LoRA, the paper's Table 3


def read_pairs(path) -> list[Pair]:
    """(mr, ref) rows of an E2E CSV (header with `mr` and `ref`) or a loralib txt (`mr||ref` lines), in file order.
    Raises ValueError naming the file and the fix for a missing column or a line without `||`."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # the challenge's files may start with a BOM
            reader = csv.DictReader(f)
            if not {"mr", "ref"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: the header must name 'mr' and 'ref' columns, got {reader.fieldnames}")
            return [(row["mr"].strip(), row["ref"].strip()) for row in reader if row["mr"] and row["mr"].strip()]
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        mr, sep, ref = line.partition("||")
        if not sep:
            raise ValueError(f"{path}, line {number}: no '||' between the MR and the reference: {line[:80]!r}")
        pairs.append((mr.strip(), ref.strip()))
    return pairs


def load(directory) -> tuple[list[Pair], list[Pair]]:
    """(train, test) pairs from `directory`: trainset.csv / testset_w_refs.csv, else loralib's train.txt / test.txt."""
    directory, out = Path(directory), []
    for split, names in FILES.items():
        found = [directory / n for n in names if (directory / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{directory} has none of {names} for the {split} split; pass the E2E dataset's "
                                    f"directory (the challenge's CSVs or loralib's examples/NLG/data/e2e)")
        out.append(read_pairs(found[0]))
    return out[0], out[1]


def group(pairs: Iterable[Pair]) -> list[tuple[str, tuple[str, ...]]]:
    """The references of each MR, MRs in first-seen order: [(mr, (ref, ...)), ...]."""
    refs: dict[str, list[str]] = {}
    for mr, ref in pairs:
        refs.setdefault(mr, []).append(ref)
    return [(mr, tuple(r)) for mr, r in refs.items()]


@jax.tree_util.register_dataclass  # a pytree: a batch goes into a jitted step as one argument
@dataclasses.dataclass(frozen=True)
class Arrays:
    """Encoded (context, completion) examples, right-padded with the EOS id."""

    ids: np.ndarray  # shape=(n, max_len), dtype=int32; context + completion
    targets: np.ndarray  # shape=(n, max_len), dtype=int32; ids shifted left by one: the token each position predicts
    mask: np.ndarray  # shape=(n, max_len), dtype=float32; 1 where targets is a completion token (its EOS included)

    def __getitem__(self, index) -> Arrays:
        return Arrays(self.ids[index], self.targets[index], self.mask[index])

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def next_token(cls, windows: np.ndarray) -> Arrays:
        """Language-model examples of int32 windows (n, seq): every position predicts the next, the last none."""
        mask = np.ones(windows.shape, np.float32)
        mask[:, -1] = 0.0
        return cls(windows, np.roll(windows, -1, axis=1), mask)


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of `EOS` in `tokenizer`; a ValueError when it has none."""
    token = tokenizer.token_to_id(EOS)
    if token is None:
        raise ValueError(f"the tokenizer has no {EOS!r} token; the E2E recipe needs GPT-2's tokenizer (or one with it)")
    return token


def context_ids(tokenizer: Tokenizer, mr: str) -> list[int]:
    """The prompt of an MR: its tokens, then the EOS id as separator."""
    return [*tokenizer.encode(mr, add_special_tokens=False).ids, eos_id(tokenizer)]


def encode(tokenizer: Tokenizer, pairs: Sequence[Pair], *, max_len: int) -> Arrays:
    """loralib's training examples (module docstring), padded to `max_len` tokens. Raises ValueError for an
    example longer than max_len (naming it and its length) instead of cutting off its target."""
    eos, rows = eos_id(tokenizer), []
    for i, (mr, ref) in enumerate(pairs):
        completion = [*tokenizer.encode(" " + ref, add_special_tokens=False).ids, eos]
        context = context_ids(tokenizer, mr)
        if len(context) + len(completion) > max_len:
            raise ValueError(f"example {i} has {len(context) + len(completion)} tokens, more than max_len={max_len}; "
                             f"raise max_len (seq_len): {mr[:60]!r}")
        rows.append((context, completion))
    ids = np.full((len(rows), max_len), eos, np.int32)
    targets, mask = ids.copy(), np.zeros((len(rows), max_len), np.float32)
    for i, (context, completion) in enumerate(rows):
        tokens = context + completion
        ids[i, : len(tokens)] = tokens
        targets[i, : len(tokens) - 1] = tokens[1:]
        mask[i, len(context) - 1: len(tokens) - 1] = 1.0  # the positions that predict completion tokens
    return Arrays(ids, targets, mask)


def buckets(lengths: Sequence[int], size: int) -> list[np.ndarray]:
    """Index arrays (size,) over prompts of EQUAL length (jlora's `generate` takes no padding): prompts grouped by
    length, in chunks of `size`; a short last chunk is filled by repeating its last index (one batch shape per
    length), so callers keep the first `len(set(chunk))` results. Each index appears in exactly one chunk."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    out = []
    for n in sorted(by_length):
        members = by_length[n]
        for start in range(0, len(members), size):
            chunk = members[start: start + size]
            out.append(np.array(chunk + chunk[-1:] * (size - len(chunk)), np.int32))
    return out


def completion_text(tokenizer: Tokenizer, new_ids: Sequence[int]) -> str:
    """The text of generated ids, up to (not including) the first EOS."""
    ids, eos = list(map(int, new_ids)), eos_id(tokenizer)
    return tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids).strip()


def beam_decode(step_fn, init_cache, tokenizer: Tokenizer, mrs: Sequence[str], *, batch: int,
                max_new_tokens: int, **generate_kwargs) -> tuple[list[str], int]:
    """The completions of `mrs` by `jlora.models.generate(step_fn, ...)` (EOS stops, then pads), `batch` prompts of
    one length at a time (`buckets`); `init_cache(batch, max_len)` makes the empty cache. Returns (texts, number of
    distinct prompt lengths = compilations)."""
    prompts, eos, out = [context_ids(tokenizer, mr) for mr in mrs], eos_id(tokenizer), [""] * len(mrs)
    for idx in tqdm(buckets([len(p) for p in prompts], batch), desc="decode"):
        ids = np.array([prompts[i] for i in idx], np.int32)
        got = generate(step_fn, ids, cache=init_cache(len(idx), ids.shape[1] + max_new_tokens),
                       max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos, **generate_kwargs)
        for i, row in zip(idx, np.asarray(got)):
            out[i] = completion_text(tokenizer, row[ids.shape[1]:])
    return out, len({len(p) for p in prompts})


def words(text: str) -> list[str]:
    """Lowercased words and punctuation marks: "The Eagle, £20." -> ["the", "eagle", ",", "£", "20", "."]."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """(corpus BLEU 0..100, sacrebleu's signature) with every reference of each hypothesis, lowercased."""
    from sacrebleu.metrics import BLEU

    metric, most = BLEU(lowercase=True), max(map(len, references))
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
    score = metric.corpus_score(list(hypotheses), streams).score
    return float(score), str(metric.get_signature())


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """nltk's corpus NIST over `words`. n-gram orders longer than every hypothesis carry no information (0/0, taken
    as 0): they are left out, which nltk would instead divide by zero on; no words at all scores 0."""
    from nltk.translate.nist_score import corpus_nist

    hyps = [words(h) for h in hypotheses]
    n = min(n, max(map(len, hyps), default=0))
    return float(corpus_nist([[words(r) for r in refs] for refs in references], hyps, n=n)) if n else 0.0


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F1 0..100: per hypothesis the best over its references (rouge-score, lowercased, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return 100 * float(np.mean([scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure
                                for hyp, refs in zip(hypotheses, references)]))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """coco-caption's CIDEr-D (pycocoevalcap) on `words` joined by spaces; its idf comes from these references, so
    a corpus of one MR scores 0 (every n-gram is in every document)."""
    from pycocoevalcap.cider.cider import Cider

    refs = {i: [" ".join(words(r)) for r in rs] for i, rs in enumerate(references)}
    hyps = {i: [" ".join(words(h))] for i, h in enumerate(hypotheses)}
    return float(Cider().compute_score(refs, hyps)[0])


def metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU, NIST, ROUGE-L and CIDEr of one hypothesis per MR against its references (module docstring)."""
    if len(hypotheses) != len(references) or not hypotheses or not all(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets; need one per MR, "
                         f"each MR with at least one reference")
    score, signature = bleu(hypotheses, references)
    return dict(bleu=score, nist=nist(hypotheses, references), rouge_l=rouge_l(hypotheses, references),
                cider=cider(hypotheses, references), bleu_signature=signature,
                meteor=None, meteor_note="left out: nltk's METEOR needs the WordNet data, not reachable offline")


def report(r: dict) -> str:
    """The Markdown of an experiments.nlg E2E result: the setup, the metrics beside the paper's, 5 outputs."""
    c, m = r["config"], r["metrics"]
    lines = [f"# E2E NLG: GPT-2 + LoRA (the paper's recipe){' (smoke run)' if c['smoke'] else ''}", "",
             f"Model {c['model'] or 'random tiny GPT-2'}; LoRA r={c['rank']}, alpha={c['alpha']:g} on c_attn's q and "
             f"v, dropout {c['lora_dropout']:g}; label smoothing {c['label_smoothing']:g}; loralib AdamW lr "
             f"{c['lr']:g}, wd {c['weight_decay']:g}; {r['steps']} steps of {c['batch']} ({r['warmup']} warm-up) on "
             f"{r['n_train']:,} examples; beam {c['beam']}, length penalty {c['length_penalty']:g}, no-repeat "
             f"{c['no_repeat_ngram_size']}; {r['n_test_mrs']} test MRs ({r['n_test_refs']} references). Trainable "
             f"{r['trainable']:,} of {r['total']:,}; train {r['train_s']:.0f} s, decode {r['decode_s']:.0f} s "
             f"({r['prompt_buckets']} prompt lengths), {r['backend']}.", "",
             "| metric | this run | paper (GPT-2 M) |", "|---|---:|---:|"]
    lines += [f"| {k} | {'—' if m[k] is None else f'{m[k]:.4g}'} | {PAPER[k]:g} |" for k in PAPER]
    lines += ["", f"METEOR: {m['meteor_note']}. BLEU: sacrebleu {m['bleu_signature']}.", "", "| MR | output |",
              "|---|---|", *(f"| {cell(s['mr'])} | {cell(s['output'])} |" for s in r["samples"])]
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    """`text` as one Markdown table cell: newlines as spaces, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


NAMES = ("The Vaults", "Blue Spice", "The Eagle", "Aromi", "Zizzi", "The Mill", "Cotto", "Wildwood", "Alimentum")
KINDS, FOODS, AREAS = ("pub", "coffee shop", "restaurant"), ("Italian", "French", "Chinese"), ("riverside", "centre")
TEMPLATES = ("{n} is a {k} serving {f} food in the {a}.", "In the {a} there is a {f} {k} called {n}.",
             "{n} serves {f} food. It is a {k} in the {a}.")


def fixture(*, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """A synthetic E2E-format (train, test) for smoke runs: distinct MRs `name[..], eatType[..], food[..],
    area[..]`, two references each in train and three in test, from fixed templates."""
    rng = np.random.default_rng(seed)
    combos = [(n, k, f, a) for n in NAMES for k in KINDS for f in FOODS for a in AREAS]
    chosen = [combos[i] for i in rng.permutation(len(combos))[: n_train + n_test]]

    def rows(combos, n_refs):
        return [(f"name[{n}], eatType[{k}], food[{f}], area[{a}]", t.format(n=n, k=k, f=f, a=a))
                for n, k, f, a in combos for t in TEMPLATES[:n_refs]]

    return rows(chosen[:n_train], 2), rows(chosen[n_train:], 3)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `EOS` trained in memory on `texts` (smoke runs: no tokenizer asset needed)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
