"""``report.json``, ``report.md``, ``results.md`` (the measured part of the Results page, docs/results.md) and the
plots of a bench directory. Every comparison is computed here from numbers measured in the same bench directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_write_text

ARMS = {  # key -> what the arm is, in the comparison table
    "ours": "ours: activation importance + logit KD",
    "random": "random importance + logit KD",
    "magnitude": "magnitude importance + logit KD",
    "ce": "ours pruned, trained with CE (no teacher)",
    "scratch": "same architecture from random weights, CE",
    "depth": "depth-pruned (same params) + logit KD",
    "corrected": "teacher corrected first, then ours",
    "lsq": "ours + lsq weight correction + logit KD",
    "full": "ours, full method: NAS shape + lsq + logit KD",
    "modelopt": "NVIDIA ModelOpt pruning + our logit KD",
}

# The target of the bench: our full method beats the peer by at least this much after equal distillation.
PEER_MARGIN = 0.05


def tokens_to_reach(curve: list, loss: float) -> Optional[float]:
    """The first token count at which a held-out ``curve`` [(tokens, loss)] is at or below ``loss``."""
    return next((tokens for tokens, value in curve if value <= loss), None)


def derive(results: dict) -> dict:
    """The comparisons the report states, from the measured numbers."""
    t, ours, rec = results["teacher_loss"], results["ours"], results["recovery"]
    d: dict = {"recovery": (ours["pruned_loss"] - rec["loss"]) / (ours["pruned_loss"] - t),
               "recovery_tokens": rec["tokens"]}
    d["vs_ours"] = {key: results[key]["loss"] - ours["loss"] for key in ARMS if key in results and key != "ours"}
    target_eval = ours["curve"]["eval"][-1][1] if ours["curve"]["eval"] else None
    scratch = results["scratch"]
    reached = tokens_to_reach(scratch["curve"]["eval"], target_eval) if target_eval is not None else None
    d["scratch"] = {"target_eval_loss": target_eval, "tokens_to_reach": reached, "budget": scratch["tokens"],
                    "ratio": (reached or scratch["tokens"]) / ours["tokens"], "lower_bound": reached is None}
    d["claims"] = {
        "width_minus_depth": ours["loss"] - results["depth"]["loss"],
        "kd_minus_ce": ours["loss"] - results["ce"]["loss"],
        "corrected_minus_none": results["corrected"]["loss"] - ours["loss"],
        "iterative_minus_one_shot": results["iterative"]["pruned_loss"] - ours["pruned_loss"],
        "best_aggregation": min(results["aggregation"], key=lambda a: a["pruned_loss"]),
    }
    if "modelopt" in results:
        m = results["modelopt"]
        d["modelopt"] = {"pruned": m["pruned_loss"] - ours["pruned_loss"], "trained": m["loss"] - ours["loss"]}
        if "ours_importance_s" in m and "modelopt_importance_s" in m:
            d["modelopt"]["importance_time_ratio"] = m["modelopt_importance_s"] / m["ours_importance_s"]
        best = results.get("full") or results.get("lsq")
        if best is not None:
            # ModelOpt - ours' best arm, after pruning and after each distillation budget both arms ran.
            which = "full" if "full" in results else "lsq"
            margins = {"pruned": m["pruned_loss"] - best["pruned_loss"], "compare": m["loss"] - best["loss"]}
            if "recovery" in m and "recovery" in best:
                margins["recovery"] = m["recovery"]["loss"] - best["recovery"]["loss"]
            d["target"] = {"arm": which, **margins, "margin": PEER_MARGIN,
                           "met": all(v >= PEER_MARGIN for k, v in margins.items() if k != "pruned")}
            if which == "full":
                d["target"]["param_ratio"] = best["param_ratio_to_target"]
    return d


def _plots(out: Path, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    curve = results["recovery"]["curve"]
    if curve["train"]:
        ax.plot(*zip(*curve["train"]), label="train KD loss", alpha=0.5)
    if curve["eval"]:
        ax.plot(*zip(*curve["eval"]), marker="o", label="student held-out loss")
    ax.axhline(results["teacher_loss"], color="k", linestyle="--", label="teacher held-out loss")
    ax.axhline(results["ours"]["pruned_loss"], color="r", linestyle=":", label="pruned, before KD")
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Recovery of the width-pruned student")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recovery.png", dpi=100)
    plt.close(fig)
    files.append("recovery.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in ARMS.items():
        if key in results and results[key]["curve"]["eval"]:
            ax.plot(*zip(*results[key]["curve"]["eval"]), marker=".", label=label)
    ax.axhline(results["teacher_loss"], color="k", linestyle="--", label="teacher")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss during training")
    ax.set_title("Arms at the comparison budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "arms.png", dpi=100)
    plt.close(fig)
    files.append("arms.png")
    return files


def _corpus_table(results: dict) -> list[str]:
    """With a blend or out-of-blend texts: each model's held-out loss on each corpus, scored on its own."""
    names = list(results.get("teacher_losses") or {})
    if not names:
        return []
    extra = set(results.get("out_of_blend", []))
    lines = ["", "Held-out loss per corpus (each corpus's held-out split scored on its own; the losses above weight "
             "a blend's corpora as the blend; an out-of-blend text is in no arm's training, calibration or "
             "search data).", "",
             "| model | " + " | ".join(f"{n} (out of blend)" if n in extra else n for n in names) + " |",
             "|---|" + "---|" * len(names)]

    def row(label: str, losses: dict) -> None:
        lines.append(f"| {label} | " + " | ".join(f"{losses[n]:.4f}" for n in names) + " |")

    row("teacher", results["teacher_losses"])
    if results.get("corrected", {}).get("teacher_losses"):
        row("corrected teacher", results["corrected"]["teacher_losses"])
    for key, label in [("ours", ARMS["ours"]), ("recovery", "ours, recovery budget"),
                       *[(k, v) for k, v in ARMS.items() if k != "ours"]]:
        a = results.get(key)
        if a is None:
            continue
        if a.get("pruned_losses"):
            row(f"{label}, pruned", a["pruned_losses"])
        for trained in (a, a.get("recovery")):
            if trained and trained.get("losses"):
                row(f"{label}, after {trained['tokens']:,} tokens", trained["losses"])
    return lines


def _markdown(results: dict, d: dict, log: list[dict], plots: list[str]) -> tuple[str, str]:
    """(report.md, results.md)."""
    b = results["budgets"]
    t, ours, rec = results["teacher_loss"], results["ours"], results["recovery"]
    mode = "quick" if results["quick"] else "full"
    head = [
        f"Teacher: {results['teacher_params']:,} params; students: {results['student_params']:,} "
        f"({results['student_params'] / results['teacher_params']:.1%}). Bench mode: {mode}. Losses in nats/token "
        f"on {b['eval_windows']} held-out windows (a split that no arm trains or calibrates on).",
        "",
        "| recovery | value |", "|---|---|",
        f"| teacher loss | {t:.4f} |",
        f"| pruned loss (ours) | {ours['pruned_loss']:.4f} |",
        f"| distilled loss after {rec['tokens']:,} tokens | {rec['loss']:.4f} |",
        f"| recovery R = (pruned - distilled) / (pruned - teacher) | **{d['recovery']:.3f}** (target >= 0.90) |",
    ]
    if results.get("teacher_cache"):
        head += ["", "Every distillation from the teacher (all arms but `corrected`, whose teacher differs) read one "
                     "logit cache of the teacher's top-k log-probabilities (`distill.teacher_cache`), written once."]
    at_recovery = [(ARMS[key], results[key]["pruned_loss"], results[key]["recovery"])
                   for key in ("lsq", "full", "modelopt") if "recovery" in results.get(key, {})]
    if at_recovery:
        head += ["", f"At the recovery budget ({rec['tokens']:,} distillation tokens):", "",
                 "| arm | loss after pruning | loss after distillation |", "|---|---|---|",
                 f"| {ARMS['ours']} | {ours['pruned_loss']:.4f} | {rec['loss']:.4f} |"]
        head += [f"| {label} | {pruned:.4f} | {r['loss']:.4f} |" for label, pruned, r in at_recovery]
    arms = ["", f"Arms at {b['compare_tokens']:,} training tokens (scratch: {results['scratch']['tokens']:,}); "
                "difference = arm - ours, positive means ours is better.", "",
            "| arm | loss after pruning | loss after training | difference |", "|---|---|---|---|"]
    for key, label in ARMS.items():
        if key in results:
            a = results[key]
            diff = "" if key == "ours" else f"{d['vs_ours'][key]:+.4f}"
            pruned = f"{a['pruned_loss']:.4f}" if "pruned_loss" in a else "-"
            if key == "full":
                label += f" ({a['params']:,} params, {a['param_ratio_to_target']:.3f}x the target's)"
            arms.append(f"| {label} | {pruned} | {a['loss']:.4f} | {diff} |")
    arms += _corpus_table(results)
    s = d["scratch"]
    reach = (f"reached ours' held-out loss ({s['target_eval_loss']:.4f}) after {s['tokens_to_reach']:,} tokens: "
             f"{s['ratio']:.1f}x ours' tokens" if not s["lower_bound"] else
             f"did not reach ours' held-out loss ({s['target_eval_loss']:.4f}) within {s['budget']:,} tokens: "
             f"it needs more than {s['ratio']:.1f}x ours' tokens (the paper reports 40x at scale)")
    arms += ["", f"From scratch: {reach}."]
    c = d["claims"]
    agg = c["best_aggregation"]
    one_shot = "agrees (within 0.05)" if abs(c["iterative_minus_one_shot"]) < 0.05 else "differs (by 0.05 or more)"
    claims = ["", "| claim (paper) | measured | direction |", "|---|---|---|",
              f"| width beats depth after KD | width - depth = {c['width_minus_depth']:+.4f} | "
              f"{'agrees' if c['width_minus_depth'] < 0 else 'disagrees'} |",
              f"| logit KD beats CE | KD - CE = {c['kd_minus_ce']:+.4f} | "
              f"{'agrees' if c['kd_minus_ce'] < 0 else 'disagrees'} |",
              f"| teacher correction helps on a shifted corpus | corrected - none = {c['corrected_minus_none']:+.4f} | "
              f"{'agrees' if c['corrected_minus_none'] < 0 else 'disagrees'} |",
              f"| iterative importance = one-shot (pruned loss) | iterative - one-shot = "
              f"{c['iterative_minus_one_shot']:+.4f} | "
              f"{one_shot} |",
              f"| mean over sequence, L2 over batch is best | best: {agg['seq_agg']} / {agg['batch_agg']} | "
              f"{'agrees' if (agg['seq_agg'], agg['batch_agg']) == ('mean', 'l2') else 'disagrees'} |"]
    details = ["", "| aggregation (seq / batch) | loss after pruning |", "|---|---|"]
    details += [f"| {a['seq_agg']} / {a['batch_agg']} | {a['pruned_loss']:.4f} |" for a in results["aggregation"]]
    details.append(f"\nCorrected teacher held-out loss: {results['corrected']['teacher_loss']:.4f} "
                   f"(original {t:.4f}, {b['correction_tokens']:,} CE tokens).")
    peer = []
    if "modelopt" in d:
        m = d["modelopt"]
        peer = ["", "| NVIDIA ModelOpt 0.43.0 vs ours (the same shape, no correction) | ModelOpt - ours |", "|---|---|",
                f"| loss after pruning | {m['pruned']:+.4f} |",
                f"| loss after {b['compare_tokens']:,} KD tokens | {m['trained']:+.4f} |"]
        if "importance_time_ratio" in m:
            peer.append(f"| importance-estimation time | {m['importance_time_ratio']:.2f}x ours |")
    if "target" in d:
        g = d["target"]
        arm = ARMS[g["arm"]]
        budgets = [("compare", f"{b['compare_tokens']:,}")]
        if "recovery" in g:
            budgets.append(("recovery", f"{rec['tokens']:,}"))
        peer += ["", f"Target: {arm} at least {g['margin']} nats better than ModelOpt + the same KD, at equal "
                     "parameters" + (f" (ours {g['param_ratio']:.3f}x ModelOpt's)" if "param_ratio" in g else "")
                     + ", after equal distillation: " + ("**met**" if g["met"] else "**missed**") + ".", "",
                 f"| ModelOpt - {g['arm']} | value | target |", "|---|---|---|",
                 f"| loss after pruning | {g['pruned']:+.4f} | |"]
        peer += [f"| loss after {n} KD tokens | {g[k]:+.4f} | {'met' if g[k] >= g['margin'] else 'missed'} "
                 f"(>= +{g['margin']}) |" for k, n in budgets]
    speed = []
    if "speed" in results:
        sp = results["speed"]
        kd = sp["kd_throughput"]["loops"]
        dtype, other = sp["kd_throughput"]["dtype"], sp["kd_throughput"]["other_dtype"]
        short = {"bfloat16": "bf16", "float32": "fp32"}
        hf = kd["HF loop, AdamW"]["tokens_per_second"]
        speed = ["", "| speed (this CPU) | measured |", "|---|---|"]
        for name in ("nemo_minitron", "nemo_minitron, compile"):
            speed.append(f"| distillation tokens/s, {name} / HF KD loop | {kd[name]['tokens_per_second'] / hf:.2f} "
                         f"(target >= 1.3); {kd[name]['fraction_of_gemm_peak']:.1%} of measured {short[dtype]} GEMM "
                         f"FLOP/s |")
        speed += [f"| HF KD loop | {hf:.1f} tok/s; {kd['HF loop, AdamW']['fraction_of_gemm_peak']:.1%} of "
                  f"{short[dtype]} GEMM |",
                  f"| distillation tokens/s, nemo_minitron in {short[dtype]} (`auto` here) / in {short[other]} | "
                  f"{kd['nemo_minitron']['tokens_per_second'] / kd[f'nemo_minitron, {other}']['tokens_per_second']:.2f}"
                  f" |",
                  f"| importance estimation / plain forward | {sp['importance_overhead']['ratio']:.3f} |",
                  f"| KL peak memory fused / naive (vocab {sp['kl_memory']['vocab']:,} x {sp['kl_memory']['tokens']:,} "
                  f"tokens) | {sp['kl_memory']['ratio']:.3f} (target <= 0.125) |",
                  f"| distillation step time TP=2 / TP=1 | {sp['tp_step_time']['ratio']:.2f} |"]
    total = sum(e["seconds"] for e in log)
    stages = ["", "| stage | seconds |", "|---|---|"] + [
        f"| {e['stage']} | {e['seconds']:.0f}{' (earlier run)' if e['skipped'] else ''} |" for e in log]
    stages.append(f"| total | {total:.0f} ({total / 60:.1f} min) |")
    pictures = [""] + [f"![{p}]({p})" for p in plots]
    report = "\n".join(["# Benchmark report", "", *head, *arms, "", "## The paper's claims", *claims, *details,
                        "", "## Peer", *peer, "", "## Speed", *speed, "", "## Wall time", *stages, *pictures]) + "\n"
    short = "\n".join([*head, *arms, *claims, *peer, *speed]) + "\n"
    return report, short


def write(out: Path, results: dict, log: list[dict]) -> dict:
    derived = derive(results)
    plots = _plots(out, results)
    report, short = _markdown(results, derived, log, plots)
    atomic_write_text(out / "report.json", json.dumps({"results": results, "derived": derived, "stages": log},
                                                      indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "results.md", short)
    return {"report": str(out / "report.md"), "recovery": derived["recovery"], "vs_ours": derived["vs_ours"],
            "claims": derived["claims"], "modelopt": derived.get("modelopt")}


README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def splice_readme(readme: str, results: str) -> str:
    """``readme`` (the Results page) with the text between its results markers replaced by ``results`` (a bench's
    results.md)."""
    start, end = README_MARKERS
    i, j = readme.find(start), readme.find(end)
    if i < 0 or j < i:
        raise UserError(f"no {start} ... {end} section to put the results in")
    return readme[:i + len(start)] + "\n" + results.rstrip("\n") + "\n" + readme[j:]
