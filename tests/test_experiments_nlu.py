"""experiments.data, experiments.nlu and experiments.demo: the splits, the SST-2 reader, the recipe's pieces, an
end-to-end --quick run, and the demo's merge checks failing when they should."""

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import perturb
from tokenizers import Tokenizer, models, pre_tokenizers

import jlora
from experiments import count_params, data, demo, nlu, parse_config
from jlora.models import BertConfig, BertForSequenceClassification

TINY = BertConfig(vocab_size=53, hidden_size=12, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20,
                  max_position_embeddings=16, num_labels=2)


def tiny_bert(seed=0):
    model = BertForSequenceClassification(TINY)
    ids = jax.random.randint(jax.random.key(seed + 1), (6, 9), 1, TINY.vocab_size, jnp.int32)
    mask = jnp.ones_like(ids).at[:, 7:].set(0)
    arrays = data.Arrays(np.asarray(ids), np.asarray(mask), np.array([0, 1, 1, 0, 1, 0], np.int32))
    return model, model.init(jax.random.key(seed), ids, mask), arrays


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("sentiment", "confidence", "text"), *rows])


def test_read_tweets_fixture(tmp_path):
    path = tmp_path / "tweets.csv"
    write_csv(path, [("negative", "1", "bad &amp; sad"), ("neutral", "1", "meh"), ("positive", "0.7", "good"),
                     ("positive", "1", "good"), ("positive", "1", "both"), ("negative", "1", "both"),
                     ("positive", "1", "odd \xff bytes"), ("negative", "1", "  ")])
    raw = path.read_bytes().replace("\xff".encode(), b"\xff")  # a byte that is not UTF-8
    path.write_bytes(raw)
    rows = data.read_tweets(path)
    assert rows == [("bad & sad", 0), ("good", 1), ("odd \ufffd bytes", 1)]
    with pytest.raises(ValueError, match="negative"):
        data.tweets(path, n_train=2, n_test=2)
    with pytest.raises(ValueError, match="even"):
        data.tweets(path, n_train=3, n_test=2)


def test_tweets_split_fixture_balanced_disjoint(tmp_path):
    path = tmp_path / "tweets.csv"
    write_csv(path, [(s, "1", f"{s} {i}") for s in ("negative", "positive") for i in range(7)])
    task = data.tweets(path, n_train=6, n_test=4, seed=1)
    assert np.bincount(task.train.labels).tolist() == [3, 3] and np.bincount(task.test.labels).tolist() == [2, 2]
    assert not set(task.train.texts) & set(task.test.texts)
    assert all(t.startswith(data.LABELS[y]) for t, y in zip(task.train.texts + task.test.texts,
                                                            np.concatenate([task.train.labels, task.test.labels])))


@pytest.mark.assets
def test_tweets_split_deterministic_balanced_disjoint():
    a, b = data.tweets(n_train=2000, n_test=1000), data.tweets(n_train=2000, n_test=1000)
    assert a.train.texts == b.train.texts and a.test.texts == b.test.texts
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert len(a.train.texts) == 2000 and len(a.test.texts) == 1000
    assert np.bincount(a.train.labels).tolist() == [1000, 1000] and np.bincount(a.test.labels).tolist() == [500, 500]
    assert not set(a.train.texts) & set(a.test.texts) and len(set(a.train.texts)) == 2000
    other = data.tweets(n_train=2000, n_test=1000, seed=1)
    assert other.train.texts != a.train.texts
    assert len(data.read_tweets()) == 22805  # 23,140 positive/negative rows, less repeats and conflicts


def test_sst2_tsv_fixture(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nhide new secretions \t0\n"it \'s a charming" journey \t1\n'
                                        "the greatest musicians \t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nit 's a charming and often affecting journey . \t1\n")
    task = data.sst2(tmp_path)
    assert task.train.texts == ("hide new secretions ", "\"it 's a charming\" journey ", "the greatest musicians ")
    assert task.train.labels.tolist() == [0, 1, 1] and task.train.labels.dtype == np.int32
    assert task.test.labels.tolist() == [1] and len(task.test.texts) == 1
    small = data.sst2(tmp_path, n_train=2, seed=3)
    assert len(small.train.texts) == 2 and set(small.train.texts) <= set(task.train.texts)
    (tmp_path / "dev.tsv").write_text("text\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match="sentence"):
        data.sst2(tmp_path)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nx\t2\n")
    with pytest.raises(ValueError, match="lines"):
        data.sst2(tmp_path)
    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        data.sst2(tmp_path)


def test_encode_pads_truncates_and_leaves_the_tokenizer_alone():
    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = data.encode(tok, data.Split(("a b", "c c c c c z"), np.array([1, 0], np.int32)), max_len=4)
    np.testing.assert_array_equal(out.ids, [[2, 3, 0, 0], [4, 4, 4, 4]])
    np.testing.assert_array_equal(out.mask, [[1, 1, 0, 0], [1, 1, 1, 1]])
    assert out.ids.dtype == out.mask.dtype == out.labels.dtype == np.int32
    assert tok.padding is None and tok.truncation is None


def test_batches_seeded_drop_last():
    a = list(data.batches(10, 3, epochs=2, key=jax.random.key(0)))
    b = list(data.batches(10, 3, epochs=2, key=jax.random.key(0)))
    c = list(data.batches(10, 3, epochs=2, key=jax.random.key(1)))
    assert len(a) == 6 and all(x.shape == (3,) for x in a)
    assert all((x == y).all() for x, y in zip(a, b)) and any((x != y).any() for x, y in zip(a, c))
    assert len(set(np.concatenate(a[:3]).tolist())) == 9  # one pass: distinct indices, one left out
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(2, 3, epochs=1, key=jax.random.key(0)))


def test_take_continues_into_further_passes_and_windows_drop_the_tail():
    key = jax.random.key(3)
    got = list(data.take(10, 3, 7, key))  # 3 batches a pass: 7 steps need 3 passes, the third cut short
    assert len(got) == 7 and all((x == y).all() for x, y in zip(got, data.batches(10, 3, epochs=3, key=key)))
    w = data.windows(np.arange(11, dtype=np.int64), 4)
    assert w.dtype == np.int32 and w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 8, 9, 10 left out


@pytest.mark.assets
def test_shakespeare_names_the_plays_for_an_unknown_one():
    with pytest.raises(ValueError, match=r"no play 'hamlet_q2'.*'tempest'"):
        data.shakespeare(None, seq=8, held_out="hamlet_q2", n_held=1)


def test_parse_config_flags_and_quick():
    c = parse_config(nlu.Config, ["--seeds", "4", "5", "--no-train_pooler", "--lr_lora", "1e-3"], quick=nlu.QUICK)
    assert c.seeds == (4, 5) and c.train_pooler is False and c.lr_lora == 1e-3 and c.epochs == nlu.Config().epochs
    q = parse_config(nlu.Config, ["--quick", "--epochs", "2"], quick=nlu.QUICK)
    assert q.n_train == nlu.QUICK["n_train"] and q.epochs == 2 and q.seeds == (0,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.epochs = 3


def test_schedule_warmup_and_decay():
    config = nlu.Config(warmup_ratio=0.06)
    sched = nlu.schedule(config, lr=1.0, total_steps=310)  # ceil(18.6) = 19 warm-up steps
    assert float(sched(0)) == 0.0 and float(sched(19)) == pytest.approx(1.0) and float(sched(310)) == 0.0
    assert float(sched(10)) == pytest.approx(10 / 19) and float(sched(19 + 291 // 2)) == pytest.approx(146 / 291)
    assert nlu.decays("params/classifier/kernel") and nlu.decays("base_model.model.x.lora_A.default.weight")
    assert not nlu.decays("params/bert/pooler/dense/bias") and not nlu.decays("bert.embeddings.LayerNorm.weight")


@pytest.mark.parametrize("method, pooler", [("lora", False), ("lora", True), ("head", False), ("full", False)])
def test_setup_trains_only_what_it_should(method, pooler):
    model, variables, arrays = tiny_bert()
    config = nlu.Config(train_pooler=pooler, batch=3, epochs=2, lr_lora=1e-2)
    s = nlu.setup(method, model, variables, config, key=jax.random.key(2), example=(arrays.ids, arrays.mask))
    head = 12 * 2 + 2 + (12 * 12 + 12 if pooler else 0)
    want = {"lora": 2 * 2 * (12 * 8 + 8 * 12) + head, "head": head, "full": count_params(variables)}[method]
    assert count_params(s.trainable) == want
    trained, losses = nlu.train(s, arrays, config, lr=1e-2, key=jax.random.key(3), dropout_key=jax.random.key(4))
    assert losses.shape == (4,) and np.isfinite(losses).all()
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), s.trainable, trained)
    assert all(jax.tree_util.tree_leaves(changed))
    assert nlu.predict(s, trained, arrays, batch=4).shape == (6, 2)  # 6 = 4 + a padded batch of 2


def test_demo_checks_fail_when_they_should():
    model, variables, arrays = tiny_bert()
    s = nlu.setup("lora", model, variables, nlu.Config(), key=jax.random.key(2), example=(arrays.ids, arrays.mask))
    adapters = perturb(s.trainable)  # lora_b non-zero, or merging would change nothing
    merged = jlora.merge(s.frozen, adapters, s.lora_config)
    factored = nlu.predict(s, adapters, arrays, batch=4)
    assert all(ok for ok, _ in demo.verify_merge(model, merged, arrays, factored, atol=1e-4, batch=4))
    base = np.asarray(model.apply(variables, arrays.ids, arrays.mask))
    assert np.abs(base - factored).max() > 1e-2  # the adapters matter, so the check is not vacuous
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(9), x.shape)
        if "['0']['attention']['self']['query']['kernel']" in jax.tree_util.keystr(p) else x, merged)
    checks = demo.verify_merge(model, bad, arrays, factored, atol=1e-4, batch=4)
    assert not checks[1][0] and "max |diff|" in checks[1][1]
    flipped = demo.compare_logits(factored, factored[:, ::-1], atol=1e-4)
    assert not flipped[0][0] and not flipped[1][0]
    assert demo.same_tree(adapters, adapters)[0]
    assert not demo.same_tree(adapters, perturb(adapters, seed=5, scale=1e-6))[0]
    assert not demo.same_tree(adapters, {"params": {}})[0]


def read_results(out, name):
    result = json.loads((out / f"{name}.json").read_text())
    table = (out / f"{name}.md").read_text()
    assert (out / f"{name}.png").stat().st_size > 0
    assert result["config"]["name"] == name and result["n_train"] == nlu.QUICK["n_train"]
    for row in result["summary"]:
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] == 0.0 and row["seeds"] == 1
        assert f"| {row['impl']} | {row['method']} | " in table
    for run in result["runs"]:
        steps = nlu.QUICK["n_train"] // nlu.QUICK["batch"] * nlu.QUICK["epochs"]
        assert len(run["losses"]) == steps and run["train_s"] > 0 and run["trainable"] <= run["total"]
    return result, table


@pytest.mark.assets
def test_nlu_quick_end_to_end(tmp_path):
    assert nlu.main(["--quick", "--peer", "none", "--out_dir", str(tmp_path)]) == 0
    result, table = read_results(tmp_path, "nlu_quick")
    rows = {r["method"]: r for r in result["summary"]}
    assert list(rows) == ["lora", "full", "head"]
    assert rows["lora"]["trainable"] == 6 * 2 * (384 * 8 + 8 * 384) + 384 * 2 + 2  # 74,498
    assert rows["head"]["trainable"] == 770 and rows["full"]["trainable"] == rows["full"]["total"]
    assert table.count("\n|") == 2 + 3


@pytest.mark.assets
@pytest.mark.reference
def test_nlu_quick_peft_peer(tmp_path):
    assert nlu.main(["--quick", "--methods", "lora", "--out_dir", str(tmp_path), "--name", "nlu_quick"]) == 0
    result, _ = read_results(tmp_path, "nlu_quick")
    jl, peft = result["summary"]
    assert (jl["impl"], peft["impl"]) == ("jlora", "peft")
    assert jl["trainable"] == peft["trainable"] == 74498 and jl["total"] == peft["total"]
    jl_run, peft_run = result["runs"]
    assert abs(jl_run["losses"][0] - peft_run["losses"][0]) < 0.5  # both start from a fresh head near ln 2


def test_optimizer_matches_a_plain_adamw_without_decay_on_biases():
    config = nlu.Config(weight_decay=0.1, max_grad_norm=1e9, warmup_ratio=0.0)
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = nlu.optimizer(config, lr=0.5, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * np.ones((2, 2)), rtol=1e-6)  # decay only
    np.testing.assert_allclose(updates["bias"], 0.0)
    assert isinstance(tx, optax.GradientTransformation)
