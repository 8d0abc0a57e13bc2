"""Side-by-side chat answers: several Hugging Face models' greedy answers to the same few prompts, each prompt
put in each model's own chat template (a run's report shows the teacher's and the student's)."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.chat.generate import has_chat_template, model_dir


def chat_answers(models: dict[str, str | Path], prompts: list[str], max_new_tokens: int) -> list[dict]:
    """``{"prompt", "answers": {name: text}}`` per prompt: each model's greedy answer (transformers, fp32, batch
    1, at most ``max_new_tokens`` tokens, cut at EOS), the prompt rendered with its tokenizer's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    rows = [{"prompt": p, "answers": {}} for p in prompts]
    for name, ref in models.items():
        path = model_dir(str(ref))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = tokenizer.eos_token_id
        settings = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        for row in rows:
            text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                new = model.generate(ids, generation_config=settings)[0, ids.shape[1]:].tolist()
            if eos in new:
                new = new[: new.index(eos)]
            row["answers"][name] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return rows


def teacher_and_student_answers(teacher: Path, student: Path, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """:func:`chat_answers` of a teacher and a student; none (an empty list) when the teacher's tokenizer has no
    chat template (a base model: there is no chat ability to keep)."""
    if not has_chat_template(Path(teacher)):
        return []
    return chat_answers({"teacher": teacher, "student": student}, prompts, max_new_tokens)


def _cell(text: str) -> str:
    """``text`` as one markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def answers_markdown(rows: list[dict]) -> str:
    """The answers of :func:`chat_answers` as a markdown table: one row per prompt, one column per model."""
    names = list(rows[0]["answers"]) if rows else []
    lines = ["| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {_cell(row['prompt'])} | " + " | ".join(_cell(row["answers"][n]) for n in names) + " |")
    return "\n".join(lines)
