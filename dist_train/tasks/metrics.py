"""Evaluation metrics as functions of summable statistics.

Every metric here is computed from counts or sums (a confusion matrix, per-label true/false
positives, moments, entity matches) that ranks add up with one all-reduce, so a metric over the
whole evaluation set is exact on any number of workers. Pure numpy.
"""

from __future__ import annotations

import math

import numpy as np


def confusion(pred: np.ndarray, gold: np.ndarray, n: int, weight: np.ndarray) -> np.ndarray:
    """n×n matrix, rows gold, columns predicted, of the examples' weights (gold -1: not counted)."""
    m = np.zeros((n, n), dtype=np.float64)
    keep = gold >= 0
    np.add.at(m, (gold[keep], pred[keep]), weight[keep])
    return m


def perplexity(loss: float) -> float:
    """exp(loss), capped (exp(50)) so a diverged model gives a number rather than an overflow."""
    return math.exp(min(loss, 50.0))


def ratio(a: float, b: float) -> float:
    """a / b, and 0 for an empty denominator (a class never predicted has precision 0)."""
    return a / b if b > 0 else 0.0


def classification_metrics(m: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix."""
    tp = np.diag(m)
    per = {}
    f1s = []
    for i, lab in enumerate(labels):
        p, r = ratio(tp[i], m[:, i].sum()), ratio(tp[i], m[i].sum())
        f1 = ratio(2 * p * r, p + r)
        per[lab] = {"precision": p, "recall": r, "f1": f1, "support": float(m[i].sum())}
        if m[i].sum() > 0 or m[:, i].sum() > 0:  # a class absent from gold and predictions has no F1
            f1s.append(f1)
    return {"accuracy": ratio(tp.sum(), m.sum()), "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
            "per_class": per}


def multilabel_counts(pred: np.ndarray, gold: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per label [tp, fp, fn] (L×3, weighted) then [exact matches, examples]: (3L + 2,)."""
    w = weight[:, None]
    tp = ((pred == 1) & (gold == 1)) * w
    fp = ((pred == 1) & (gold == 0)) * w
    fn = ((pred == 0) & (gold == 1)) * w
    exact = float(((pred == gold).all(axis=1) * weight).sum())
    return np.concatenate([np.stack([tp.sum(0), fp.sum(0), fn.sum(0)], 1).ravel(), [exact, weight.sum()]])


def multilabel_metrics(stats: np.ndarray, labels: list[str]) -> dict:
    counts = stats[:-2].reshape(len(labels), 3)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    f1 = [ratio(2 * t, 2 * t + a + b) for t, a, b in zip(tp, fp, fn, strict=True)]
    return {"exact_match": ratio(stats[-2], stats[-1]), "macro_f1": float(np.mean(f1)),
            "micro_f1": ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()),
            "per_class": {lab: {"f1": f, "support": float(t + b)} for lab, f, t, b in zip(labels, f1, tp, fn,
                                                                                           strict=True)}}


def regression_sums(pred: np.ndarray, gold: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[n, Σx, Σy, Σxx, Σyy, Σxy, Σ(x-y)²] (weighted) of predictions x and gold values y."""
    x, y, w = pred.astype(np.float64), gold.astype(np.float64), weight
    return np.array([w.sum(), (w * x).sum(), (w * y).sum(), (w * x * x).sum(), (w * y * y).sum(),
                     (w * x * y).sum(), (w * (x - y) ** 2).sum()])


def regression_metrics(s: np.ndarray) -> dict:
    n, sx, sy, sxx, syy, sxy, se = s
    cov = sxy - sx * sy / n if n else 0.0
    vx, vy = (sxx - sx * sx / n, syy - sy * sy / n) if n else (0.0, 0.0)
    return {"mse": ratio(se, n), "pearson": cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0}


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO/IOB2 tag sequence; an I- without its B- starts a span
    (the conlleval convention)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        if start is not None and (prefix != "I" or typ != kind):
            spans.add((kind, start, i))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return spans


def entity_counts(pred: list[list[str]], gold: list[list[str]], weight: list[float]) -> np.ndarray:
    """[matched entities, predicted entities, gold entities, correct tags, tags] (weighted)."""
    s = np.zeros(5)
    for p, g, w in zip(pred, gold, weight, strict=True):
        ps, gs = entities(p), entities(g)
        s += w * np.array([len(ps & gs), len(ps), len(gs), sum(a == b for a, b in zip(p, g, strict=True)), len(g)])
    return s


def entity_metrics(s: np.ndarray) -> dict:
    p, r = ratio(s[0], s[1]), ratio(s[0], s[2])
    return {"f1": ratio(2 * p * r, p + r), "precision": p, "recall": r, "tag_accuracy": ratio(s[3], s[4])}
