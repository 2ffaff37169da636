"""What adaptation bought, as pure functions: evaluation sets, forgetting and adapted_loss, the
before/after summary, the head warm-up's schedule, and the paired bootstrap of two fine-tunes."""

import json

import numpy as np
import pytest

from dist_train.config.loader import ConfigError, load_config
from dist_train.config.schema import best_metric
from dist_train.data.evalsets import eval_sources, is_corpus, mix_name
from dist_train.data.manifest import DataError
from dist_train.tasks import metrics as M
from dist_train.tasks.compare import ExampleStats, paired_bootstrap, sentence
from dist_train.train.adaptation import score, summarize
from dist_train.train.head_warmup import body_lr_factor, warmup_steps
from dist_train.train.pretrain import pooled_metrics
from tests.conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_default_sets_are_the_main_corpus_and_every_mix_source():
    cfg = load_config(QUICKSTART, ["pretrain.data.mix=[{shards: g1, weight: 0.1}, {shards: g2, weight: 0.05, "
                                   "name: news}]"])
    assert [(s.name, s.role, s.path) for s in eval_sources(cfg)] == [
        ("domain", "domain", cfg.pretrain.data.shards), ("general_1", "general", "g1"), ("news", "general", "g2")]
    assert mix_name(None, 0, 1) == "general"
    assert best_metric(load_config(QUICKSTART), "pretrain") == "loss", "no general set: nothing to limit"
    assert best_metric(cfg, "pretrain") == "adapted_loss", "baseline on (quickstart sets it), a general set, a limit"
    assert best_metric(load_config(QUICKSTART, ["pretrain.data.mix=[{shards: g, weight: 0.1}]",
                                                "pretrain.eval.max_forgetting=null"]), "pretrain") == "loss"


def test_set_names_and_roles_are_checked():
    two = "pretrain.eval.sets=[{name: a, path: x}, {name: a, path: y}]"
    with pytest.raises(DataError, match="both give an evaluation set named 'a'"):
        eval_sources(load_config(QUICKSTART, [two]))
    with pytest.raises(DataError, match="must start with a letter"):
        eval_sources(load_config(QUICKSTART, ["pretrain.eval.sets=[{name: 'my set', path: x}]"]))
    with pytest.raises(DataError, match="no set with role: domain"):
        eval_sources(load_config(QUICKSTART, ["pretrain.eval.sets=[{name: g, path: x, role: general}]"]))
    with pytest.raises(ConfigError, match=r"pretrain.eval.sets\[0\].role = 'generic'"):
        load_config(QUICKSTART, ["pretrain.eval.sets=[{name: g, path: x, role: generic}]"])
    assert is_corpus("news.jsonl") and is_corpus("texts/*.txt") and not is_corpus("shards/general")
    assert not is_corpus("s3://bucket/general")


def test_pooled_metrics_weigh_sets_by_their_tokens():
    out = pooled_metrics({"a": (20.0, 10.0), "b": (10.0, 10.0), "g": (60.0, 20.0)},
                         {"a": "domain", "b": "domain", "g": "general"})
    assert out["a/loss"] == 2.0 and out["b/loss"] == 1.0 and out["g/loss"] == 3.0
    assert out["loss"] == pytest.approx(1.5) and out["tokens"] == 20.0
    assert out["general_loss"] == 3.0 and out["general_perplexity"] == pytest.approx(np.exp(3.0))
    assert out["perplexity"] == pytest.approx(np.exp(1.5))


def evaluation(domain: float, general: float) -> dict[str, float]:
    return {"domain/loss": np.log(domain), "domain/perplexity": domain, "news/loss": np.log(general),
            "news/perplexity": general, "loss": np.log(domain), "perplexity": domain}


ROLES = {"domain": "domain", "news": "general"}


def test_forgetting_is_the_general_sets_relative_perplexity_rise_and_limits_adapted_loss():
    before = evaluation(40.0, 20.0)
    within = score(evaluation(10.0, 21.0), before, ROLES, 0.10)
    assert within["forgetting"] == pytest.approx(0.05) and within["adapted_loss"] == within["loss"]
    over = score(evaluation(8.0, 24.0), before, ROLES, 0.10)
    assert over["forgetting"] == pytest.approx(0.20) and "adapted_loss" not in over, "over the limit: never best"
    assert "forgetting" not in score(evaluation(8.0, 24.0), None, ROLES, 0.10), "no baseline: nothing to compare"
    assert "adapted_loss" in score(evaluation(8.0, 24.0), before, ROLES, None), "no limit: every evaluation ranks"


def test_summary_gives_before_after_change_forgetting_and_a_verdict():
    s = summarize(evaluation(40.0, 20.0), 0, evaluation(10.0, 21.0), 60, ROLES, 0.10)
    assert s["sets"]["domain"]["change"]["perplexity_rel"] == pytest.approx(-0.75)
    assert s["sets"]["news"]["forgetting"] == pytest.approx(0.05) and "forgetting" not in s["sets"]["domain"]
    assert s["verdict"] == "adapted" and s["domain_gain"] == pytest.approx(0.75)
    assert s["summary"] == "domain perplexity 40 → 10 (-75.0%), general 20 → 21 (+5.0%, limit 10%)"
    assert summarize(evaluation(40.0, 20.0), 0, evaluation(10.0, 30.0), 60, ROLES, 0.10)["verdict"] == "forgetting"
    assert summarize(evaluation(40.0, 20.0), 0, evaluation(41.0, 20.0), 60, ROLES, 0.10)["verdict"] == "no_gain"
    json.dumps(s)  # report.json material


def test_head_warmup_holds_the_body_then_ramps_it():
    assert warmup_steps(None, 1000, True) == 100 and warmup_steps(None, 60, True) == 10
    assert warmup_steps(None, 10_000, True) == 200 and warmup_steps(None, 10, True) == 5, "never over half"
    assert warmup_steps(None, 1000, False) == 0 and warmup_steps(50, 1000, False) == 0, "no new head: nothing"
    assert warmup_steps(0, 1000, True) == 0 and warmup_steps(30, 1000, True) == 30
    assert warmup_steps(None, 1000, True, auto=False) == 0, "finetune: no warm-up unless asked for"
    factors = [body_lr_factor(s, 3, 4) for s in range(9)]
    assert factors == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert body_lr_factor(3, 3, 0) == 1.0


def stats_of(task_metrics_stats: list[np.ndarray]) -> ExampleStats:
    return ExampleStats.from_dense(dict(enumerate(task_metrics_stats)), len(task_metrics_stats))


def classification_stats(gold: np.ndarray, pred: np.ndarray, n: int) -> list[np.ndarray]:
    return [np.concatenate([M.confusion(np.array([p]), np.array([g]), n, np.ones(1)).ravel(), [0.0]])
            for g, p in zip(gold, pred, strict=True)]


def accuracy(n: int):
    return lambda s: {"accuracy": M.ratio(np.trace(s[:-1].reshape(n, n)), s[:-1].sum())}


def test_paired_bootstrap_finds_a_real_gain_and_not_a_fake_one(tmp_path):
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 400)
    good = np.where(rng.random(400) < 0.9, gold, (gold + 1) % 3)
    worse = np.where(rng.random(400) < 0.7, gold, (gold + 1) % 3)
    a, b = stats_of(classification_stats(gold, good, 3)), stats_of(classification_stats(gold, worse, 3))
    a.save(tmp_path / "a.npz")
    a = ExampleStats.load(tmp_path / "a.npz")
    c = paired_bootstrap(a, b, accuracy(3), "accuracy", True, resamples=500)
    assert c["adapted"] == pytest.approx((good == gold).mean()) and c["base"] == pytest.approx((worse == gold).mean())
    assert c["verdict"] == "helped" and c["ci95"][0] > 0 < c["difference"] and c["ci95"][0] < c["difference"] < c[
        "ci95"][1]
    same = paired_bootstrap(a, a, accuracy(3), "accuracy", True, resamples=200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["verdict"] == "no_clear_difference"
    assert paired_bootstrap(b, a, accuracy(3), "accuracy", True, resamples=200)["verdict"] == "hurt"
    # a smaller-is-better metric: lower error is the better side
    err = lambda s: {"error": 1 - accuracy(3)(s)["accuracy"]}  # noqa: E731
    assert paired_bootstrap(a, b, err, "error", False, resamples=200)["verdict"] == "helped"
    assert sentence(c).startswith("adaptation helped: test accuracy ")
    with pytest.raises(ValueError, match="differ in size"):
        paired_bootstrap(a, stats_of(classification_stats(gold[:10], good[:10], 3)), accuracy(3), "accuracy", True)


def test_export_keeps_the_pooler_the_masked_lm_does_not_use(tmp_path):
    """A BERT checkpoint with a pooler, adapted as a masked LM (which has none): the export carries the
    pooler, so a classifier fine-tuned from it starts with the trained pooler, not a random one."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    from dist_train.checkpoint.export import carry_weights
    from dist_train.model.build import _load_report

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "start")  # headless: pooler.dense.weight, no "bert." prefix
    mlm, info = BertForMaskedLM.from_pretrained(tmp_path / "start", output_loading_info=True)
    report = _load_report(str(tmp_path / "start"), info)
    assert "pooler.dense.weight" in report.unused and "cls.predictions.transform.dense.weight" in report.new
    mlm.save_pretrained(tmp_path / "export")
    assert carry_weights(tmp_path / "export", report.source, report.unused, mlm.base_model_prefix) == [
        "bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    clf, info = BertForSequenceClassification.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"], "the pooler came along"
    start = BertModel.from_pretrained(tmp_path / "start")
    assert np.array_equal(clf.bert.pooler.dense.weight.detach().numpy(), start.pooler.dense.weight.detach().numpy())
    assert carry_weights(tmp_path / "export", report.source, report.unused, "bert") == [], "carried once"


def test_packing_a_corpus_never_replaces_a_directory_it_did_not_make(tmp_path, tokenizer_dir, corpus_jsonl):
    from dist_train.data.evalsets import EvalSource, built_dir, pack_corpus

    s = EvalSource("legal", "domain", str(corpus_jsonl))
    theirs = built_dir(tmp_path, "legal")
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not made by dist-train"):
        pack_corpus(s, tmp_path, str(tokenizer_dir), 32, progress=False)
    assert (theirs / "notes.txt").read_text() == "mine"
    (theirs / "notes.txt").unlink()
    theirs.rmdir()
    man = pack_corpus(s, tmp_path, str(tokenizer_dir), 32, progress=False)
    assert man.train and not man.validation, "all of it is held out: val split off"
    again = pack_corpus(s, tmp_path, str(tokenizer_dir), 32, progress=False)
    assert again.train == man.train


def test_early_stopping_counts_an_evaluation_over_the_forgetting_limit_as_no_improvement():
    from dist_train.train.loop import EarlyStopping, TrainState

    rule, state = EarlyStopping("adapted_loss", False, patience=2), TrainState()
    assert not rule.should_stop(state, {"loss": 3.0, "adapted_loss": 3.0})
    assert not rule.should_stop(state, {"loss": 2.0, "forgetting": 0.3})  # over the limit: no adapted_loss
    assert rule.should_stop(state, {"loss": 1.9, "forgetting": 0.4})
    assert not EarlyStopping("accuracy", True, patience=1).should_stop(TrainState(), {}), "no validation data"


def test_a_removed_key_says_where_it_went():
    with pytest.raises(ConfigError, match=r"it became pretrain\.eval\.samples"):
        load_config(QUICKSTART, ["pretrain.train.eval_batches=8"])
