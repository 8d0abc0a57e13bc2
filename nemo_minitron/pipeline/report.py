"""What a run shows: ``report.md`` and ``report.json`` in the run directory, with PNG plots (importance
heatmaps, loss curves) and the before/after table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from nemo_minitron.chat.answers import answers_markdown
from nemo_minitron.dtypes import resolve
from nemo_minitron.pipeline.config import GENERATED, RunConfig, RunData
from nemo_minitron.pipeline.ledger import Ledger


def _result(ledger: Ledger, key: str) -> Optional[dict]:
    entry = ledger.stages.get(key)
    return None if entry is None else entry["result"]


def _loss_curves_png(path: Path, steps: list[dict], teacher_loss: float, held_out_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    offset = 0.0
    for step in steps:
        metrics = Path(step["distill_output"]) / "metrics.jsonl" if step.get("distill_output") else None
        if step.get("pruned_loss") is not None:
            ax.scatter([offset], [step["pruned_loss"]], color="red", zorder=3,
                       label="held-out loss after pruning" if step["index"] == 1 else None)
        if metrics is None or not metrics.is_file():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [(offset + r["tokens"], r.get("kd", r["loss"])) for r in records if "loss" in r and "tokens" in r]
        held = [(offset + r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r and "tokens" in r]
        if train:
            ax.plot(*zip(*train), color="tab:blue", alpha=0.7,
                    label="student KD loss (train)" if step["index"] == 1 else None)
        if held:
            ax.plot(*zip(*held), color="tab:orange", marker="o", label=held_out_label if step["index"] == 1 else None)
        offset += step.get("kd_tokens") or 0
    ax.axhline(teacher_loss, color="black", linestyle="--", label="teacher held-out loss")
    ax.set(xlabel="distillation tokens", ylabel="loss (nats/token)", title="Distillation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows: list[dict], generation: Optional[dict], columns: list[tuple[str, str]]) -> str:
    """The before/after table; ``columns`` are ``(header, key of row["losses"])`` of the per-corpus losses."""
    head = "| model | parameters | held-out loss | held-out ppl | " + "".join(f"{h} | " for h, _ in columns)
    lines = [head + "generation tok/s |", "|---|---|---|---|" + "---|" * len(columns) + "---|"]
    for row in rows:
        gen = ""
        if generation and row["name"] in ("teacher", "final student"):
            key = "teacher" if row["name"] == "teacher" else "student"
            gen = f"{generation[f'{key}_tokens_per_second']:.1f}"
        losses = "".join(f"{row['losses'][k]:.4f} | " for _, k in columns)
        lines.append(f"| {row['name']} | {row['params'] / 1e6:.1f}M ({row['param_ratio']:.1%}) | {row['loss']:.4f} | "
                     f"{row['perplexity']:.2f} | {losses}{gen} |")
    return "\n".join(lines)


def corpus_losses(ledger: Ledger, data: RunData, key: str) -> dict[str, float]:
    """Held-out loss of the finished eval stage ``key`` per corpus of a blend (one corpus: none, the headline
    loss is its loss) and per out-of-blend text (stage ``<key>.out_of_blend``), by the corpus's ``input``."""
    found = {}
    if data.blended():
        components = _result(ledger, key)["components"]
        found.update({ref: c["loss"] for (ref, _), c in zip(data.components(), components, strict=True)})
    if data.out_of_blend:
        components = _result(ledger, f"{key}.out_of_blend")["components"]
        found.update({t.input: c["loss"] for t, c in zip(data.out_of_blend, components, strict=True)})
    return found


def _weights(cfg: RunConfig) -> list[tuple[str, float]]:
    corpora = cfg.data.components()
    total = sum(w for _, w in corpora)
    return [(name, w / total) for name, w in corpora]


def write(cfg: RunConfig, ledger: Ledger, log: list[dict], generation: Optional[dict], student_hf: Path,
          chat: Optional[list[dict]] = None) -> dict:
    """Write ``report.json``, ``report.md`` and the plots; print the before/after table; return the summary."""
    from nemo_minitron.checkpoint.io import read_model_config, resolve_model_dir

    out = Path(cfg.output)
    names = [ref for ref, _ in cfg.data.components()]
    extra = [t.input for t in cfg.data.out_of_blend]
    columns = [(f"{name} (weight {w:.2f})", name) for name, w in _weights(cfg) if len(names) > 1]
    columns += [(f"{name} (out of blend)", name) for name in extra]
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    teacher_eval = _result(ledger, "eval.teacher")
    teacher_ref = str(out / "teacher_correction" / "final") if cfg.teacher_correction else cfg.teacher
    teacher_params = read_model_config(resolve_model_dir(teacher_ref)).num_params()
    rows = [{"name": "teacher", "params": teacher_params, "param_ratio": 1.0, "loss": teacher_eval["loss"],
             "perplexity": teacher_eval["perplexity"], "losses": corpus_losses(ledger, cfg.data, "eval.teacher")}]
    steps, images = [], []
    for i, step in enumerate(cfg.schedule, 1):
        home = out / f"step{i}"
        nas = _result(ledger, f"step{i}.nas")
        pruned_dir = Path(nas["best_pruned"]) if nas else home / "pruned"
        shape = read_model_config(pruned_dir)
        params = shape.num_params()
        pruned_eval = _result(ledger, f"step{i}.eval_pruned")
        distilled = _result(ledger, f"step{i}.distill")
        distilled_eval = _result(ledger, f"step{i}.eval_distilled")
        heatmap = (home / "nas" if nas else pruned_dir) / "importance.png"
        if heatmap.is_file():
            shutil.copyfile(heatmap, files / f"step{i}_importance.png")
            images.append((f"Step {i}: importance", f"report_files/step{i}_importance.png"))
        rows.append({"name": f"step {i} pruned", "params": params, "param_ratio": params / teacher_params,
                     "loss": pruned_eval["loss"], "perplexity": pruned_eval["perplexity"],
                     "losses": corpus_losses(ledger, cfg.data, f"step{i}.eval_pruned")})
        if distilled_eval:
            rows.append({"name": f"step {i} distilled", "params": params, "param_ratio": params / teacher_params,
                         "loss": distilled_eval["loss"], "perplexity": distilled_eval["perplexity"],
                         "losses": corpus_losses(ledger, cfg.data, f"step{i}.eval_distilled")})
        steps.append({
            "index": i,
            "shape": shape.model_dump(),
            "params": params,
            "pruned_loss": pruned_eval["loss"],
            "distilled_loss": distilled_eval["loss"] if distilled_eval else None,
            "kd_tokens": distilled["tokens"] if distilled else 0,
            "nas_short_kd_tokens": nas["short_kd_tokens_total"] if nas else 0,
            "distill_output": str(home / "distill") if distilled else None,
            "distill_tokens_per_second": distilled["tokens_per_second"] if distilled else None,
            "nas": nas,
        })
    final = dict(rows[-1], name="final student")
    rows.append(final)
    # The distillations evaluate on the eval stages' windows, in their own compute dtype.
    held_out_label = "student held-out loss"
    train_dtype, eval_dtype = resolve(cfg.distill.train.dtype), resolve(cfg.eval.dtype)
    if train_dtype != eval_dtype:
        held_out_label += f" ({train_dtype}; eval stages: {eval_dtype})"
    _loss_curves_png(files / "loss_curves.png", steps, teacher_eval["loss"], held_out_label)
    images.append(("Loss curves", "report_files/loss_curves.png"))
    kd_tokens = sum(s["kd_tokens"] + s["nas_short_kd_tokens"] for s in steps)
    stages = [{"stage": key, "seconds": entry["seconds"]} for key, entry in ledger.stages.items()]
    summary = {
        "teacher": rows[0],
        "rows": rows,
        "steps": steps,
        "kd_tokens": kd_tokens,
        "generation": generation,
        "chat_answers": chat,
        "stages": stages,
        "wall_seconds": sum(s["seconds"] for s in stages),
        "this_invocation": log,
        "exported_hf_student": str(student_hf),
        "report": str(out / "report.md"),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = _table(rows, generation, columns)
    if len(names) > 1:
        corpus = ("blend " + ", ".join(f"{w:.2f} `{name}`" for name, w in _weights(cfg)) + f" (prepared under "
                  f"`{out / 'data'}`); held-out loss: each corpus's held-out split scored on its own, the headline "
                  "weighted as the blend")
    else:
        corpus = f"corpus `{names[0]}`; held-out split of `{out / 'data'}`"
    made = _result(ledger, "generate")
    if made:
        corpus += (f"; `{GENERATED}`: the teacher's sampled answers to {made['prompts']} prompts of "
                   f"`{cfg.data.generated.prompts}` ({made['answer_tokens']:,} answer tokens, "
                   f"{made['unfinished_answers']} cut at the token limit), in its chat template")
    if extra:
        corpus += ("; out of blend (never trained, calibrated or searched on; its held-out split, prepared under "
                   f"`{out / 'out_of_blend'}`): " + ", ".join(f"`{name}`" for name in extra))
    md = [f"# Minitron run: {out}", "", f"Teacher `{cfg.teacher}`"
          + (" (after teacher correction)" if cfg.teacher_correction else "")
          + f"; {corpus}.", "", "## Before / after", "",
          table, "", f"Distillation tokens: {kd_tokens:,}."]
    if generation:
        md += ["", f"Greedy generation on this machine (transformers, fp32, batch 1, {generation['new_tokens']} "
               f"tokens): student {generation['speedup']:.2f}x the teacher's tokens/s."]
    if chat:
        md += ["", "## Chat answers", "", f"Greedy answers (transformers, fp32, at most {cfg.report.chat_tokens} "
               "tokens) of the teacher and the exported student, each prompt in the tokenizer's chat template:", "",
               answers_markdown(chat)]
    elif chat is not None:
        md += ["", "## Chat answers", "", "None: the teacher's tokenizer has no chat template."]
    for step in steps:
        if step["nas"]:
            md += ["", f"## Step {step['index']}: architecture search", "",
                   "| candidate | parameters | loss after pruning (rank) | loss after short KD (rank) |",
                   "|---|---|---|---|"]
            for c in step["nas"]["candidates"]:
                short = f"{c['loss_short_kd']:.4f} ({c['rank_short_kd']})" if "rank_short_kd" in c else "-"
                pruned = f"{c['loss_pruned']:.4f} ({c['rank_pruned']})"
                md.append(f"| {c['name']} | {c['params'] / 1e6:.1f}M | {pruned} | {short} |")
            md += ["", f"Best: {step['nas']['best']}; ranking changed by the short distillation: "
                   f"{'yes' if step['nas']['ranking_changed'] else 'no'}."]
    md += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {s['stage']} | {s['seconds']:.1f} |" for s in stages]
    for title, path in images:
        md += ["", f"## {title}", "", f"![{title}]({path})"]
    md += ["", f"Exported student (Hugging Face): `{student_hf}`", ""]
    (out / "report.md").write_text("\n".join(md))
    print(table)
    print(f"report: {out / 'report.md'}\nexported HF student: {student_hf}", flush=True)
    return {"report": str(out / "report.md"), "exported_hf_student": str(student_hf), "kd_tokens": kd_tokens,
            "teacher_perplexity": rows[0]["perplexity"], "final_perplexity": final["perplexity"],
            "teacher_losses": rows[0]["losses"], "final_losses": final["losses"]}
