"""Fine-tuning tasks: metrics from summable statistics, record reading and splits, encoding
(labels, sub-token alignment, prompt masking) and losses."""

import json

import numpy as np
import pytest
import torch

from dist_train.data.manifest import DataError
from dist_train.tasks import build_task, task_fields
from dist_train.tasks import metrics as M
from dist_train.tasks.records import read_records, split_records

SPEC = {"text_field": "text", "text_pair_field": None, "label_field": "label", "tokens_field": "tokens",
        "tags_field": "tags", "prompt_field": "prompt", "response_field": "response", "max_length": 64,
        "label_smoothing": 0.0, "class_weights": "none"}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from dist_train.model.build import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def test_classification_metrics_from_a_confusion_matrix():
    gold, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    m = M.confusion(pred, gold, 3, np.ones(6))
    out = M.classification_metrics(m, ["a", "b", "c"])
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                     "support": 2.0}
    f1 = [2 * .5 * .5 / 1, 0.8, 2 * 1 * .5 / 1.5]
    assert out["macro_f1"] == pytest.approx(np.mean(f1))


def test_statistics_add_up_over_ranks_to_the_whole():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    whole = M.regression_metrics(M.regression_sums(x, y, np.ones(50)))
    parts = M.regression_sums(x[:20], y[:20], np.ones(20)) + M.regression_sums(x[20:], y[20:], np.ones(30))
    assert M.regression_metrics(parts) == pytest.approx(whole)
    assert whole["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert whole["mse"] == pytest.approx(np.mean((x - y) ** 2))


def test_entity_f1_is_span_level():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert M.entities(gold[0]) == {("PER", 0, 2), ("LOC", 3, 4)}
    half = M.entity_metrics(M.entity_counts([["B-PER", "O", "O", "B-LOC"]], gold, [1.0]))
    assert half["precision"] == 0.5 and half["recall"] == 0.5 and half["tag_accuracy"] == 0.75
    assert M.entity_metrics(M.entity_counts(gold, gold, [1.0]))["f1"] == 1.0
    assert M.entities(["I-X", "I-X", "O"]) == {("X", 0, 2)}  # conlleval: I- without B- opens a span


def test_multilabel_metrics():
    gold = np.array([[1, 0, 1], [0, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 0]])
    out = M.multilabel_metrics(M.multilabel_counts(pred, gold, np.ones(2)), ["a", "b", "c"])
    assert out["exact_match"] == 0.5 and out["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_records_from_jsonl_csv_and_parquet_and_a_deterministic_split(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert read_records(str(tmp_path / name), ["text", "label"]) == rows
    a = split_records(rows, seed=1, validation=0.2, test=0.1)
    assert a == split_records(rows, seed=1, validation=0.2, test=0.1) and sum(map(len, a)) == 40
    assert 0 < len(a[1]) < 16 and a != split_records(rows, seed=2, validation=0.2, test=0.1)
    with pytest.raises(DataError, match=r"has no field 'label' \(fields: \['text', 'y'\]\): set the finetune.data"):
        (tmp_path / "e.jsonl").write_text('{"text": "x", "y": 1}\n')
        read_records(str(tmp_path / "e.jsonl"), ["text", "label"])


def test_classification_labels_weights_and_unseen_labels(tok):
    train = [{"text": "a b", "label": "x"}] * 3 + [{"text": "c", "label": "y"}]
    task = build_task("sequence_classification", {**SPEC, "class_weights": "balanced"}, tok, train)
    assert task.labels == ["x", "y"] and task.weights.tolist() == pytest.approx([4 / 6, 4 / 2])
    batch = task.encode([{"text": "q", "label": "y"}, {"text": "q", "label": "zzz"}])
    assert batch["labels"].tolist() == [1, 2]  # an unseen label gets an id no logit has: always wrong
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    m = task.metrics(task.stats(logits, batch, np.ones(2)))
    assert m["accuracy"] == 0.5 and m["examples"] == 2
    with pytest.raises(DataError, match="needs at least 2"):
        build_task("sequence_classification", SPEC, tok, [{"text": "a", "label": "x"}])


def test_whole_number_labels_match_across_files_whatever_their_type(tok, tmp_path):
    """A jsonl column with a fraction anywhere is read as floats (0.0, 1.0): its classes are still the 0 and 1
    of a test file read as integers, not labels the model never saw."""
    from dist_train.tasks.records import read_records

    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1.0}\n'
                                          '{"text": "c", "label": 1}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    train = read_records(str(tmp_path / "train.jsonl"), ["text", "label"])
    assert {type(r["label"]) for r in train} == {float}, "datasets reads the whole column as floats"
    task = build_task("sequence_classification", SPEC, tok, train)
    assert task.labels == ["0", "1"]
    test = read_records(str(tmp_path / "test.jsonl"), ["text", "label"])
    assert task.encode(test)["labels"].tolist() == [0, 1], "no test label is unseen"


def test_token_tags_go_to_each_words_first_subtoken(tok):
    rec = {"tokens": ["Return", "unconditionally", "None"], "tags": ["O", "O", "B-LITERAL"]}
    task = build_task("token_classification", SPEC, tok, [rec])
    batch = task.encode([rec])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    words = tok([rec["tokens"]], is_split_into_words=True).word_ids(0)
    firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
    assert len(ids) > 3  # "unconditionally" splits into sub-tokens: only its first one is labeled
    assert [int(labels[i]) for i in firsts] == [task.id[t] for t in rec["tags"]]
    assert all(int(x) == -100 for i, x in enumerate(labels) if i not in firsts)
    pred = task.predict(torch.nn.functional.one_hot(labels.clamp(min=0), len(task.labels)).float()[None],
                        task.encode([rec], with_labels=False))
    assert pred == [{"tags": rec["tags"]}]


def test_sft_prompt_tokens_contribute_zero_loss(tok):
    """Whatever the model predicts at prompt positions, the loss is the same: only response
    tokens (and the EOS that ends them) are targets."""
    rec = {"prompt": "Which module? The cosine of x.\nAnswer:", "response": " math"}
    task = build_task("sft", SPEC, tok, [rec])
    batch = task.encode([rec, {"prompt": "Short", "response": " text and more"}])
    labels = batch["labels"]
    n_prompt = len(tok(rec["prompt"])["input_ids"])
    response = tok(" math", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (labels[0, :n_prompt] == -100).all()
    assert labels[0, n_prompt:n_prompt + len(response)].tolist() == response
    torch.manual_seed(0)
    logits = torch.randn(*labels.shape, len(tok))
    garbled = logits.clone()
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # positions that predict a response token
    garbled[~keep] = torch.randn_like(garbled[~keep]) * 100
    assert torch.equal(task.loss(logits, labels), task.loss(garbled, labels))
    assert task.targets(batch) == int(keep.sum())


def test_multilabel_and_regression_encode(tok):
    ml = build_task("multi_label_classification", SPEC, tok, [{"text": "a", "label": ["x", "y"]},
                                                              {"text": "b", "label": "y, z"}])
    assert ml.labels == ["x", "y", "z"]
    assert ml.encode([{"text": "a", "label": ["x", "z"]}])["labels"].tolist() == [[1.0, 0.0, 1.0]]
    reg = build_task("regression", SPEC, tok, [{"text": "a", "label": 1.5}])
    assert reg.encode([{"text": "a", "label": "2.5"}])["labels"].tolist() == [2.5]
    with pytest.raises(DataError, match="is not a number"):
        build_task("regression", SPEC, tok, [{"text": "a", "label": "high"}])
    assert task_fields("sequence_classification", {**SPEC, "text_pair_field": "b"}) == ["text", "b", "label"]


def test_sft_uses_the_chat_template_when_the_tokenizer_has_one(tokenizer_dir):
    from dist_train.model.build import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    task = build_task("sft", SPEC, tok, None)
    ids = task.prompt_ids("hello")
    assert tok.decode(ids) == "<|user|>hello\n<|assistant|>"
    batch = task.encode([{"prompt": "hello", "response": " hi"}])
    real = int(batch["attention_mask"][0].sum())  # then any padding
    assert (batch["labels"][0, :len(ids)] == -100).all() and (batch["labels"][0, len(ids):real] != -100).all()


def test_sft_long_examples_lose_the_prompt_first_then_the_response_end(tok):
    """What docs/finetuning.md says: a long example loses its prompt's start; only a response longer
    than max_length on its own is cut, at its end (its EOS too)."""
    task = build_task("sft", {**SPEC, "max_length": 16}, tok, None)
    prompt, short, long = "word " * 40, " ok", " and more" * 40
    kept = task.encode([{"prompt": prompt, "response": short}])
    answer = tok(short, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert kept["input_ids"].shape[1] == 16 and kept["labels"][0, -len(answer):].tolist() == answer
    cut = task.encode([{"prompt": prompt, "response": long}])
    ids = tok(long, add_special_tokens=False)["input_ids"]
    assert cut["labels"][0].tolist() == ids[:16] and tok.eos_token_id not in cut["labels"][0].tolist()
