"""What continued pretraining bought: forgetting, the combined selection metric, and the before/after
summary of every evaluation set. Pure functions of evaluation dicts (as pretrain's evaluate returns
them: "<set>/loss", "<set>/perplexity", pooled "loss" for the domain sets).

"before" is the evaluation of the starting model: at step 0, or, when a head that the checkpoint
lacked was warmed up first, at the end of that warm-up (the body is still the starting model's,
and the head no longer random: the fair reference).
"""

from __future__ import annotations

from typing import Any


def forgetting(evaluation: dict[str, float], reference: dict[str, float], general: list[str]) -> dict[str, float]:
    """Per general set: the relative perplexity increase over the reference (0.12 = 12% worse)."""
    out = {}
    for name in general:
        now, then = evaluation.get(f"{name}/perplexity"), reference.get(f"{name}/perplexity")
        if now is not None and then:
            out[name] = now / then - 1.0
    return out


def score(evaluation: dict[str, float], reference: dict[str, float] | None, roles: dict[str, str],
          max_forgetting: float | None) -> dict[str, float]:
    """The evaluation with "forgetting" (the worst general set's, when there is a reference) and
    "adapted_loss": the domain loss, present only while forgetting stays within max_forgetting, so
    that ranking checkpoints by it picks the best domain loss among those within the limit."""
    out = dict(evaluation)
    general = [n for n, r in roles.items() if r == "general"]
    worst = max(forgetting(evaluation, reference, general).values(), default=None) if reference else None
    if worst is not None:
        out["forgetting"] = worst
    if "loss" in evaluation and (worst is None or max_forgetting is None or worst <= max_forgetting):
        out["adapted_loss"] = evaluation["loss"]
    return out


def summarize(before: dict[str, float], before_step: int, after: dict[str, float], after_step: int,
              roles: dict[str, str], max_forgetting: float | None, head_warmup_steps: int = 0) -> dict[str, Any]:
    """report.json's stages.pretrain.adaptation: per set before, after and change (and forgetting for
    general sets), the worst forgetting, and a verdict with its sentence."""
    sets: dict[str, Any] = {}
    for name, role in roles.items():
        b = {k: before[f"{name}/{k}"] for k in ("loss", "perplexity") if f"{name}/{k}" in before}
        a = {k: after[f"{name}/{k}"] for k in ("loss", "perplexity") if f"{name}/{k}" in after}
        entry: dict[str, Any] = {"role": role, "before": b, "after": a}
        if b and a:
            entry["change"] = {"loss": a["loss"] - b["loss"], "perplexity": a["perplexity"] - b["perplexity"],
                               "perplexity_rel": a["perplexity"] / b["perplexity"] - 1.0}
            if role == "general":
                entry["forgetting"] = entry["change"]["perplexity_rel"]
        sets[name] = entry
    forgot = [e["forgetting"] for e in sets.values() if "forgetting" in e]
    domain = [e["change"]["perplexity_rel"] for e in sets.values() if e["role"] == "domain" and "change" in e]
    worst = max(forgot, default=None)
    gain = -(sum(domain) / len(domain)) if domain else None  # mean relative perplexity drop on the domain
    over = worst is not None and max_forgetting is not None and worst > max_forgetting
    if gain is None:
        verdict, sentence = "unknown", "no before/after evaluation to compare"
    elif gain <= 0:
        verdict, sentence = "no_gain", f"domain perplexity did not improve ({-gain:+.1%})"
    elif over:
        verdict = "forgetting"
        sentence = (f"domain perplexity {-gain:+.1%}, but general perplexity rose {worst:+.1%}, over the "
                    f"{max_forgetting:.0%} limit")
    else:
        verdict = "adapted"
        sentence = f"domain perplexity {-gain:+.1%}" + (
            f", general {worst:+.1%}" + (f" (limit {max_forgetting:.0%})" if max_forgetting is not None else "")
            if worst is not None else "")
    return {"before_step": before_step, "after_step": after_step, "head_warmup_steps": head_warmup_steps,
            "sets": sets, "domain_gain": gain, "forgetting": worst, "max_forgetting": max_forgetting,
            "verdict": verdict, "summary": sentence}
