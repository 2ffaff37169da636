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
    general = {n: e for n, e in sets.items() if "forgetting" in e}
    worst_set = max(general, key=lambda n: general[n]["forgetting"], default=None)
    worst = general[worst_set]["forgetting"] if worst_set else None
    ppl_before, ppl_after = before.get("perplexity"), after.get("perplexity")  # the domain sets pooled
    gain = 1.0 - ppl_after / ppl_before if ppl_before and ppl_after is not None else None
    over = worst is not None and max_forgetting is not None and worst > max_forgetting
    if gain is None:
        verdict, sentence = "unknown", "no before/after evaluation of the domain sets to compare"
    else:
        verdict = "no_gain" if gain <= 0 else "forgetting" if over else "adapted"
        sentence = f"domain perplexity {ppl_before:.4g} → {ppl_after:.4g} ({-gain:+.1%})"
        if worst_set is not None:
            g = sets[worst_set]
            limit = f", limit {max_forgetting:.0%}" if max_forgetting is not None else ""
            which = "" if len(general) == 1 else f" (worst: {worst_set})"
            sentence += (f", general{which} {g['before']['perplexity']:.4g} "
                         f"→ {g['after']['perplexity']:.4g} ({worst:+.1%}{limit}"
                         + (", over the limit)" if over else ")"))
    return {"before_step": before_step, "after_step": after_step, "head_warmup_steps": head_warmup_steps,
            "sets": sets, "domain_gain": gain, "forgetting": worst, "max_forgetting": max_forgetting,
            "verdict": verdict, "summary": sentence}
