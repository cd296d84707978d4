"""Zero-shot task registry: the seven lm-evaluation-harness tasks and loaders for their local copies.

Each loader turns the files in ``shared/data/<task>/`` into documents with exactly the fields of the Hugging Face
dataset that the harness's task YAML reads, so the harness's own prompts, targets and metrics apply unchanged
(:mod:`lsaq.eval.harness` feeds them in). Nothing here imports ``lm_eval``.

What differs from the hub data:

* ARC-Easy/ARC-Challenge: re-exports of the official test sets; choices get the letter labels ``A..E`` (the
  harness only uses ``choices.label.index(answerKey)``, so the letters' spelling does not matter).
* HellaSwag: llama.cpp's 6-line text form (see :func:`parse_hellaswag`) keeps ``activity_label: ctx`` but loses
  the ``ctx_a``/``ctx_b`` split that the harness's query needs (``ctx_a + " " + ctx_b.capitalize()``). We rebuild
  it: in ActivityNet items ``ctx_b`` is the unfinished sentence after the last ``". "`` and starts in lower case
  (3,243 of the 10,042 items); in WikiHow items ``ctx_b`` is empty. Endings are already preprocessed the same
  way as the harness does. Scores are therefore close to, not bit-identical with, hub-data harness scores.
* PIQA, WinoGrande: labels come from the separate ``*-labels.lst`` files / the ``answer`` field.
* BoolQ: the official dev file; ``answer`` (bool) becomes the super_glue ``label`` (0 = no, 1 = yes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lsaq.paths import shared_dir
from lsaq.records import canonical_json, file_sha256, read_jsonl, sha256_hex

HELLASWAG_ITEMS = 10_042


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task: where the harness defines it and where its local copy lives."""

    name: str
    harness_yaml: str  # path of the task's YAML inside the lm_eval package's tasks/ folder
    split: str  # the split the harness evaluates: "validation" or "test"
    files: tuple[str, ...]  # the local files, relative to the data folder (shared/data)
    loader: Callable[[Path], list[dict[str, Any]]]  # data folder -> documents in the hub schema
    metrics: tuple[str, ...]  # metrics the harness reports for this task


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(path)]


def _read_labels(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text(encoding="utf-8").split()]
    except ValueError as e:
        raise ValueError(f"{path}: labels must be integers, one per line ({e})") from e


def _with_labels(docs: list[dict[str, Any]], labels: list[int], path: Path) -> list[dict[str, Any]]:
    if len(labels) != len(docs):
        raise ValueError(f"{path}: {len(labels)} labels for {len(docs)} examples")
    return [{**d, "label": y} for d, y in zip(docs, labels)]


def load_piqa(root: Path) -> list[dict[str, Any]]:
    """``{goal, sol1, sol2, label}`` as in ``baber/piqa`` (label 0 = sol1, 1 = sol2)."""
    d = root / "piqa"
    docs = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"]} for r in _read_jsonl(d / "valid.jsonl")]
    return _with_labels(docs, _read_labels(d / "valid-labels.lst"), d / "valid-labels.lst")


def _arc_doc(qid: str, question: str, texts: list[str], answer_idx: int) -> dict[str, Any]:
    """The ``allenai/ai2_arc`` schema: ``choices = {text, label}``, ``answerKey`` one of the labels."""
    labels = [chr(ord("A") + i) for i in range(len(texts))]
    if not 0 <= answer_idx < len(texts):
        raise ValueError(f"ARC item {qid}: answer index {answer_idx} out of range for {len(texts)} choices")
    choices = {"text": texts, "label": labels}
    return {"id": qid, "question": question, "choices": choices, "answerKey": labels[answer_idx]}


def load_arc_easy(root: Path) -> list[dict[str, Any]]:
    rows = _read_jsonl(root / "arc_easy" / "ARC-Easy-test.jsonl")
    return [_arc_doc(r["id"], r["prompt"], list(r["choices"]), int(r["answer_idx"])) for r in rows]


def load_arc_challenge(root: Path) -> list[dict[str, Any]]:
    docs = []
    for r in _read_jsonl(root / "arc_challenge" / "ARC-Challenge-test.jsonl"):
        letters = [o["label"] for o in r["options"]]
        if r["answer"] not in letters:
            raise ValueError(f"ARC-Challenge item {r['id']}: answer {r['answer']!r} not among {letters}")
        docs.append(_arc_doc(r["id"], r["question"], [o["text"] for o in r["options"]], letters.index(r["answer"])))
    return docs


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """Rebuild ``(ctx_a, ctx_b)`` from a joined context: ``ctx_b`` is a lower-case tail after the last ``". "``."""
    cut = ctx.rfind(". ")
    tail = ctx[cut + 2 :] if cut >= 0 else ""
    if tail[:1].islower():
        return ctx[: cut + 1], tail
    return ctx, ""


def parse_hellaswag(path: str | Path) -> list[dict[str, Any]]:
    """Parse llama.cpp's HellaSwag text form: 6 lines per item.

    Line 1 ``activity_label: ctx``, line 2 the gold ending index (0-3), lines 3-6 the four endings. Returns
    documents with the ``Rowan/hellaswag`` fields the harness reads: ``activity_label``, ``ctx_a``, ``ctx_b``,
    ``ctx``, ``endings`` and ``label`` (a string, as on the hub). ``ValueError`` names the line of any defect.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline
    if not lines or len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a positive multiple of 6 (6 lines per item)")
    docs = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        if gold not in {"0", "1", "2", "3"}:
            raise ValueError(f"{path}:{i + 2}: gold ending index must be 0-3, got {gold!r}")
        label, sep, ctx = head.partition(": ")
        if not sep:
            raise ValueError(f"{path}:{i + 1}: expected 'activity_label: context', got {head[:60]!r}")
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        docs.append(
            {"ind": i // 6, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
             "endings": endings, "label": gold}
        )
    return docs


def load_hellaswag(root: Path) -> list[dict[str, Any]]:
    return parse_hellaswag(root / "hellaswag" / "hellaswag_val_full.txt")


def load_winogrande(root: Path) -> list[dict[str, Any]]:
    """``{sentence, option1, option2, answer}`` as in ``allenai/winogrande`` (``winogrande_xl`` validation)."""
    docs = []
    for r in _read_jsonl(root / "winogrande" / "dev.jsonl"):
        if r.get("answer") not in {"1", "2"} or "_" not in r["sentence"]:
            raise ValueError(f"WinoGrande item {r.get('qID')}: needs answer '1'/'2' and a '_' blank in the sentence")
        docs.append({k: r[k] for k in ("sentence", "option1", "option2", "answer")})
    return docs


def load_boolq(root: Path) -> list[dict[str, Any]]:
    """``{question, passage, idx, label}`` as in ``super_glue/boolq`` (label 1 = yes)."""
    rows = _read_jsonl(root / "boolq" / "dev.jsonl")
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(r["answer"]))}
            for i, r in enumerate(rows)]


def load_lambada_openai(root: Path) -> list[dict[str, Any]]:
    return [{"text": r["text"]} for r in _read_jsonl(root / "lambada_openai" / "lambada_test.jsonl")]


_MC = ("acc", "acc_norm")
TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("piqa", "piqa/piqa.yaml", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), load_piqa, _MC),
        TaskSpec("arc_easy", "arc/arc_easy.yaml", "test", ("arc_easy/ARC-Easy-test.jsonl",), load_arc_easy, _MC),
        TaskSpec(
            "arc_challenge", "arc/arc_challenge.yaml", "test", ("arc_challenge/ARC-Challenge-test.jsonl",),
            load_arc_challenge, _MC,
        ),
        TaskSpec(
            "hellaswag", "hellaswag/hellaswag.yaml", "validation", ("hellaswag/hellaswag_val_full.txt",),
            load_hellaswag, _MC,
        ),
        TaskSpec(
            "winogrande", "winogrande/default.yaml", "validation", ("winogrande/dev.jsonl",), load_winogrande, ("acc",)
        ),
        TaskSpec("boolq", "super_glue/boolq/default.yaml", "validation", ("boolq/dev.jsonl",), load_boolq, ("acc",)),
        TaskSpec(
            "lambada_openai", "lambada/lambada_openai.yaml", "test", ("lambada_openai/lambada_test.jsonl",),
            load_lambada_openai, ("acc", "perplexity"),
        ),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Parse ``"piqa,arc_easy"`` or a list into known task names (order kept, duplicates dropped).

    ``"all"`` means every task. ``ValueError`` lists the valid names for an unknown or empty selection.
    """
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t and t.strip()]
    if names == ["all"]:
        return list(TASK_NAMES)
    if not names:
        raise ValueError(f"no task given; valid tasks: {', '.join(TASK_NAMES)} (or 'all')")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(TASK_NAMES)}")
    return list(dict.fromkeys(names))


def data_root(data_dir: str | Path | None = None) -> Path | None:
    """The folder holding the local task copies: ``data_dir``, else ``<shared>/data`` when it exists."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    shared = shared_dir()
    return shared / "data" if shared is not None and (shared / "data").is_dir() else None


def has_local_data(name: str, data_dir: str | Path | None = None) -> bool:
    root = data_root(data_dir)
    return root is not None and all((root / f).is_file() for f in TASKS[name].files)


def load_local_docs(name: str, data_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """The documents of task ``name`` from its local files, and a sha256 over those files' hashes."""
    spec = TASKS[resolve_tasks([name])[0]]
    root = data_root(data_dir)
    missing = [f for f in spec.files if root is None or not (root / f).is_file()]
    if missing:
        where = root if root is not None else "<no shared data folder: set LSAQ_SHARED or pass a data folder>"
        raise ValueError(f"task {name!r}: local data not found under {where}: missing {', '.join(missing)}")
    assert root is not None
    docs = spec.loader(root)
    if not docs:
        raise ValueError(f"task {name!r}: no examples in {', '.join(spec.files)} under {root}")
    digest = sha256_hex(canonical_json([[f, file_sha256(root / f)] for f in spec.files]))
    return docs, digest
