"""experiments.e2e and experiments.nlg: the E2E readers, the loralib encoding, the metrics on hand-checked cases, the
recipe's loss and step, and an end-to-end run on an E2E-format fixture with a tiny GPT-2 and a tokenizer built here."""

import csv
import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import jlora
from experiments import e2e, nlg
from jlora.models import GPT2Config, GPT2LMHeadModel
from jlora.paths import named_leaves

TRAIN = [("name[Aromi], eatType[pub], area[riverside]", "Aromi is a pub by the riverside."),
         ("name[Aromi], eatType[pub], area[riverside]", "By the riverside there is a pub, Aromi."),
         ("name[Cotto], food[French], priceRange[high]", "Cotto serves expensive French food."),
         ("name[Cotto], food[French], priceRange[high]", "Cotto is a costly French place."),
         ("name[Cotto], food[French], priceRange[high]", "For French food at high prices, try Cotto."),
         ("name[The Mill], eatType[coffee shop]", "The Mill is a coffee shop."),
         ("name[The Mill], eatType[coffee shop]", "There is a coffee shop called The Mill.")]
TEST = [("name[Zizzi], eatType[pub], food[Italian]", "Zizzi is an Italian pub."),
        ("name[Zizzi], eatType[pub], food[Italian]", "Zizzi, a pub, serves Italian food."),
        ("name[Wildwood], area[city centre], customer rating[5 out of 5]", "Wildwood, in the city centre, rates 5/5."),
        ("name[Wildwood], area[city centre], customer rating[5 out of 5]", "Wildwood is in the centre; rated 5 of 5."),
        ("name[Wildwood], area[city centre], customer rating[5 out of 5]", "Top-rated Wildwood is central."),
        ("name[Blue Spice], food[Chinese]", "Blue Spice has Chinese food."),
        ("name[Blue Spice], food[Chinese]", "Chinese food is served at Blue Spice.")]


def write_csv(path, pairs):
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # the challenge's files carry a BOM
        csv.writer(f).writerows([("mr", "ref"), *pairs])


def tokenizer():
    """A byte-level BPE with <|endoftext|>, trained in memory on the fixture."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[e2e.EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for p in TRAIN + TEST for t in p], trainer)
    return tok


def tiny_gpt2(tok, seed=0):
    eos = tok.token_to_id(e2e.EOS)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=160, n_embd=24, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config)
    return model, model.init(jax.random.key(seed), jnp.zeros((1, 3), jnp.int32))


def test_readers_parse_both_formats_and_group_references(tmp_path):
    write_csv(tmp_path / "trainset.csv", TRAIN)
    (tmp_path / "test.txt").write_text("".join(f"{mr}||{ref}\n" for mr, ref in TEST) + "\n")
    train, test = e2e.load(tmp_path)
    assert train == TRAIN and test == TEST
    groups = e2e.group(test)
    assert [mr for mr, _ in groups] == [TEST[0][0], TEST[2][0], TEST[5][0]]
    assert [len(refs) for _, refs in groups] == [2, 3, 2] and groups[1][1][2] == "Top-rated Wildwood is central."
    (tmp_path / "bad.csv").write_text("meaning,ref\nx,y\n")
    with pytest.raises(ValueError, match="'mr' and 'ref'"):
        e2e.read_pairs(tmp_path / "bad.csv")
    (tmp_path / "bad.txt").write_text("name : Aromi | Type : pub|Aromi is a pub.\n")
    with pytest.raises(ValueError, match="line 1"):
        e2e.read_pairs(tmp_path / "bad.txt")
    (tmp_path / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="testset_w_refs.csv"):
        e2e.load(tmp_path)


def test_encoding_puts_no_loss_on_the_context():
    tok = tokenizer()
    eos = tok.token_to_id(e2e.EOS)
    arrays = e2e.encode(tok, TRAIN[:3], max_len=48)
    assert arrays.ids.shape == arrays.targets.shape == arrays.mask.shape == (3, 48)
    assert arrays.ids.dtype == arrays.targets.dtype == np.int32 and arrays.mask.dtype == np.float32
    for row, (mr, ref) in enumerate(TRAIN[:3]):
        context = tok.encode(mr).ids + [eos]  # the MR, then EOS as separator
        completion = tok.encode(" " + ref).ids + [eos]
        n = len(context) + len(completion)
        np.testing.assert_array_equal(arrays.ids[row, :n], context + completion)
        np.testing.assert_array_equal(arrays.targets[row, : n - 1], arrays.ids[row, 1:n])
        on = arrays.mask[row] == 1
        np.testing.assert_array_equal(arrays.targets[row][on], completion)  # every completion token, EOS included
        assert not on[: len(context) - 1].any() and not on[n - 1:].any()  # no context target, no padding
        assert (arrays.ids[row, n:] == eos).all()
    with pytest.raises(ValueError, match="max_len=8"):
        e2e.encode(tok, TRAIN[:1], max_len=8)
    with pytest.raises(ValueError, match="endoftext"):
        e2e.encode(Tokenizer(models.BPE()), TRAIN[:1], max_len=48)


def test_buckets_hold_equal_lengths_and_every_index_once():
    lengths = [5, 7, 5, 5, 9, 7, 5]
    chunks = e2e.buckets(lengths, 3)
    assert all(c.shape == (3,) and c.dtype == np.int32 and len({lengths[i] for i in c}) == 1 for c in chunks)
    assert sorted(i for c in chunks for i in dict.fromkeys(c.tolist())) == list(range(7))
    assert [c.tolist() for c in chunks] == [[0, 2, 3], [6, 6, 6], [1, 5, 5], [4, 4, 4]]


def test_bleu_rouge_nist_cider_on_hand_checked_cases():
    # one sentence, 6 words, one substitution: p_n = 5/6, 4/5, 3/4, 2/3, BP = 1 -> 100 * (1/3) ** (1/4)
    assert e2e.bleu(["a b c d e f"], [["a b c d e g"]])[0] == pytest.approx(100 * (1 / 3) ** 0.25, abs=1e-6)
    assert e2e.bleu(["The Eagle is a pub."], [["A pub.", "the eagle is a PUB ."]])[0] == pytest.approx(100)
    # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5, F1 = 2/3; the other reference shares nothing
    assert e2e.rouge_l(["a b c d"], [["x y", "a c d e f"]]) == pytest.approx(200 / 3)
    assert e2e.rouge_l(["a b", "c d"], [["a b"], ["x"]]) == pytest.approx(50)  # mean of 100 and 0
    refs = [["the cat sat on the mat today"], ["a dog ran in the big park"], ["birds fly over green hills now"]]
    # CIDEr-D of a perfect copy: cosine 1 for n = 1..4, no length penalty, times 10 (all 4-grams exist: >= 4 words)
    assert e2e.cider([r[0] for r in refs], refs) == pytest.approx(10.0)
    perfect, partial = e2e.nist([r[0] for r in refs], refs), e2e.nist(["the cat sat", "a dog", "birds"], refs)
    assert perfect > partial > 0 and e2e.nist(["", "", ""], refs) == 0.0
    assert e2e.words("The Eagle, £20.") == ["the", "eagle", ",", "£", "20", "."]
    scores = e2e.metrics(["x"], [["x y"]])
    assert scores["meteor"] is None and "WordNet" in scores["meteor_note"] and "nrefs:1" in scores["bleu_signature"]
    with pytest.raises(ValueError, match="one per MR"):
        e2e.metrics(["a", "b"], [["a"]])


def test_label_smoothing_equals_the_formula():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    want = 0.9 * nll + 0.1 * (-logp.mean(-1))  # loralib: (1 - e) nll + e mean over the vocabulary of -log p
    np.testing.assert_allclose(nlg.token_losses(logits, targets, 0.1), want, rtol=1e-5)
    batch = e2e.Arrays(np.zeros((2, 5), np.int32), np.asarray(targets), mask)
    assert float(nlg.masked_loss(logits, batch, 0.1)) == pytest.approx((want * mask).sum() / mask.sum(), rel=1e-5)


def test_schedule_warms_up_then_decays_clipped_for_short_runs():
    s = nlg.schedule(2e-4, warmup=500, total=26285)
    assert float(s(0)) == 0 and float(s(250)) == pytest.approx(1e-4) and float(s(500)) == pytest.approx(2e-4)
    assert float(s(26285)) == 0 and float(s(500 + 25785 // 2)) == pytest.approx(2e-4 * (25785 - 12892) / 25785)
    short = nlg.schedule(1.0, warmup=500, total=40)  # warm-up clipped to 40 // 10 = 4 steps
    assert float(short(2)) == pytest.approx(0.5) and float(short(4)) == pytest.approx(1.0)
    assert float(nlg.schedule(1.0, warmup=500, total=5)(0)) == pytest.approx(1.0)  # no warm-up left


def test_train_step_traces_once_and_the_loss_falls_on_a_repeated_batch():
    tok = tokenizer()
    model, variables = tiny_gpt2(tok)
    arrays = e2e.encode(tok, TRAIN, max_len=64)
    config = jlora.LoraConfig(rank=4, alpha=32, targets=("c_attn",), fused={"c_attn": (True, False, True)},
                              dropout=0.1)
    lora = jlora.lora_transform(model.apply, config, strict=True)
    frozen, adapters = lora.init(variables, arrays.ids[:1], key=jax.random.key(2))
    tx = jlora.loralib_adamw(3e-3, weight_decay=0.01)
    step = jax.jit(chex.assert_max_traces(nlg.step_fn(lora, tx, smoothing=0.1), n=1))
    opt_state, losses = tx.init(adapters), []
    for i in range(12):
        adapters, opt_state, loss = step(frozen, adapters, opt_state, arrays[:4], jax.random.key(10 + i))
        losses.append(float(loss))
    step(frozen, adapters, opt_state, arrays[3:7], jax.random.key(99))  # another batch of the same shape: no retrace
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.5
    assert jlora.trainable_mask(adapters) == jax.tree.map(lambda _: True, adapters)  # the LoRA pairs alone train


def write_model_dir(path, tok, model, variables):
    """A Hugging Face-style GPT-2 directory: config.json, model.safetensors, tokenizer.json."""
    path.mkdir()
    c = model.config
    (path / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_positions=c.n_positions,
        n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)))
    save_file({jlora.models.hf.default_key(p): np.asarray(x) for p, x in named_leaves(variables)},
              str(path / "model.safetensors"))
    tok.save(str(path / "tokenizer.json"))


def test_e2e_recipe_end_to_end_on_a_fixture(tmp_path):
    data = tmp_path / "e2e"
    data.mkdir()
    write_csv(data / "trainset.csv", TRAIN)
    write_csv(data / "testset_w_refs.csv", TEST)
    tok = tokenizer()
    write_model_dir(tmp_path / "gpt2", tok, *tiny_gpt2(tok, seed=3))
    out = tmp_path / "results"
    assert nlg.main(["--data", str(data), "--model", str(tmp_path / "gpt2"), "--steps", "6", "--batch", "4",
                     "--seq_len", "48", "--beam", "3", "--max_new_tokens", "8", "--eval_batch", "2",
                     "--out_dir", str(out), "--name", "e2e_fixture"]) == 0
    result = json.loads((out / "e2e_fixture.json").read_text())
    c = result["config"]
    assert (c["rank"], c["alpha"], c["lora_dropout"], c["label_smoothing"], c["lr"], c["beam"]) == (
        4, 32.0, 0.1, 0.1, 2e-4, 3) and c["length_penalty"] == 0.8 and c["no_repeat_ngram_size"] == 4
    assert result["steps"] == len(result["losses"]) == 6 and all(map(math.isfinite, result["losses"]))
    assert result["n_test_mrs"] == 3 and result["n_test_refs"] == 7 and result["n_train"] == len(TRAIN)
    assert result["trainable"] == 2 * (24 * 8 + 2 * 4 * 24)  # per layer: A (24, 2 x 4), B q and v (4, 24) each
    m = result["metrics"]
    assert all(math.isfinite(m[k]) and m[k] >= 0 for k in ("bleu", "nist", "rouge_l", "cider"))
    assert all(isinstance(s["output"], str) for s in result["samples"]) and len(result["samples"]) == 3
    table = (out / "e2e_fixture.md").read_text()
    assert "| bleu |" in table and "| rouge_l |" in table and "METEOR" in table
    with pytest.raises(ValueError, match="--data"):
        nlg.main(["--data", str(data)])


def test_run_e2e_refuses_a_model_it_cannot_run():
    tok = tokenizer()
    config = nlg.Config(seq_len=48, max_new_tokens=8)
    kwargs = dict(tokenizer=tok, train_pairs=TRAIN, test_pairs=TEST)
    llama, variables = nlg.tiny_model(tok, "llama", key=jax.random.key(0))
    with pytest.raises(ValueError, match="GPT-2"):
        nlg.run_e2e(config, model=llama, variables=variables, **kwargs)
    model, variables = tiny_gpt2(tok)  # 160 positions
    with pytest.raises(ValueError, match="n_positions=160"):
        nlg.run_e2e(dataclasses.replace(config, seq_len=512), model=model, variables=variables, **kwargs)
    with pytest.raises(ValueError, match="n_positions=160"):
        nlg.run_e2e(dataclasses.replace(config, max_new_tokens=150), model=model, variables=variables, **kwargs)


def test_shakespeare_quick_writes_perplexity_and_samples(tmp_path):
    assert nlg.main(["--task", "shakespeare", "--quick", "--out_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "nlg_shakespeare_quick.json").read_text())
    assert result["config"]["smoke"] and result["steps"] == nlg.QUICK["lm_steps"]
    for when in ("before", "after"):
        assert math.isfinite(result[when]["perplexity"]) and len(result[when]["samples"]) == 3
    assert 0 < result["trainable"] < result["total"] and result["train_s"] > 0
    assert "perplexity" in (tmp_path / "nlg_shakespeare_quick.md").read_text()
