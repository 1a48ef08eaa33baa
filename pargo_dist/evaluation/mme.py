"""Yes/no questions in MME's format: read a benchmark directory, write one, score answers as MME does.

MME (Fu et al. 2023) is a directory of subtasks. In each subtask every image has two questions,
one answered "Yes" and one "No", in a text file named like the image, one `question<TAB>answer`
per line. Two layouts occur in the release, and both are read:

    <root>/<subtask>/images/<name>.jpg  +  <root>/<subtask>/questions_answers_YN/<name>.txt
    <root>/<subtask>/<name>.png         +  <root>/<subtask>/<name>.txt

Scores per subtask: acc = share of questions answered right, acc+ = share of images with *both*
questions right (a model that always says "yes" gets acc 50 and acc+ 0), score = acc + acc+
in percent (0-200). A total sums the subtask scores; perception and cognition sum MME's own
subtasks when they are present. An answer counts as "yes"/"no" if it is that word, else by
whether its first four characters contain "yes" or "no" (lower-cased), else it is wrong.

`write_synthetic` makes such a directory from the synthetic held-out stream, with subtasks
named by what the "no" question gets wrong at the asked cell: `wrong_colour`, `wrong_kind`,
or `wrong_position` (nothing with that colour or kind there). Results are also written in MME's eval_tool layout
(`<subtask>.txt`: image, question, truth, answer) so the official calculation.py can check us.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pargo_dist.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@dataclass(frozen=True)
class Question:
    subtask: str
    image: Path
    question: str
    answer: str  # "yes" | "no"

    @property
    def key(self) -> str:
        """Stable id across runs and rank counts (for resume): subtask/image#question."""
        return f"{self.subtask}/{self.image.name}#{self.question}"


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.exists():
                return candidate
    return None


def load_benchmark(root: str | Path) -> list[Question]:
    """Every question of an MME-format directory, sorted (subtask, image, file order)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"MME directory {root} does not exist")
    questions: list[Question] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = sub / "questions_answers_YN" if (sub / "questions_answers_YN").is_dir() else sub
        img_dir = sub / "images" if (sub / "images").is_dir() else sub
        for txt in sorted(qa_dir.glob("*.txt")):
            image = _find_image(img_dir, txt.stem)
            if image is None:
                raise UserError(f"{txt}: no image named {txt.stem}.* in {img_dir}")
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                question, sep, answer = line.rstrip().rpartition("\t")
                if not sep or answer.strip().lower() not in ("yes", "no"):
                    raise UserError(f"{txt}:{n}: expected 'question<TAB>Yes|No', got {line!r}")
                questions.append(Question(sub.name, image, question.strip(), answer.strip().lower()))
    if not questions:
        raise UserError(f"{root} holds no MME subtask (<subtask>/questions_answers_YN/*.txt or <subtask>/*.txt)")
    return questions


def parse_answer(text: str) -> str:
    """"yes", "no" or "other", as MME's calculation.py reads a model's answer."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score(results: list[dict]) -> dict[str, float]:
    """MME scores from [{"subtask", "image", "answer" (truth), "prediction"}, ...].

    Keys: mme/<subtask>/{acc,acc_plus,score}, mme/acc and mme/acc_plus over all questions and
    images, mme/total (sum of scores), mme/perception and mme/cognition where MME's subtasks are
    present, mme/other (answers that were neither yes nor no, as a share).
    """
    by_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    others = 0
    for r in results:
        pred = parse_answer(r["prediction"])
        others += pred == "other"
        by_image[(r["subtask"], r["image"])].append(pred == r["answer"])
    out: dict[str, float] = {}
    subtasks = sorted({s for s, _ in by_image})
    for sub in subtasks:
        images = [v for (s, _), v in by_image.items() if s == sub]
        acc = 100 * sum(map(sum, images)) / sum(map(len, images))
        acc_plus = 100 * sum(all(v) for v in images) / len(images)
        out.update({f"mme/{sub}/acc": acc, f"mme/{sub}/acc_plus": acc_plus, f"mme/{sub}/score": acc + acc_plus})
    answers = [ok for v in by_image.values() for ok in v]
    out["mme/acc"] = 100 * sum(answers) / max(len(answers), 1)
    out["mme/acc_plus"] = 100 * sum(all(v) for v in by_image.values()) / max(len(by_image), 1)
    out["mme/total"] = sum(out[f"mme/{s}/score"] for s in subtasks)
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        if any(s in subtasks for s in group):
            out[f"mme/{name}"] = sum(out.get(f"mme/{s}/score", 0.0) for s in group)
    out["mme/other"] = others / max(len(answers), 1)
    return out


def write_results(results: list[dict], out_dir: str | Path) -> Path:
    """MME eval_tool's input: <out_dir>/<subtask>.txt, lines image<TAB>question<TAB>Yes|No<TAB>prediction."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_sub: dict[str, list[str]] = defaultdict(list)
    for r in sorted(results, key=lambda r: (r["subtask"], r["image"], r["question"])):
        pred = " ".join(r["prediction"].split())  # one line per answer
        by_sub[r["subtask"]].append(f"{r['image']}\t{r['question']}\t{r['answer'].capitalize()}\t{pred}")
    for sub, lines in by_sub.items():
        (out_dir / f"{sub}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir


def no_question_subtask(question: str, shapes: list[dict], grid: int) -> str:
    """What a synthetic "no" question gets wrong at the cell it asks about: wrong_colour, wrong_kind or
    wrong_position (nothing of that colour or kind there). Not MME's own subtask names, so their
    scores never count into MME's perception sum."""
    from pargo_dist.data.synthetic import position_name
    from pargo_dist.evaluation.details import parse_question

    colour, kind, where = parse_question(question)
    there = [s for s in shapes if position_name(s["row"], s["col"], grid) == where]
    if there and there[0]["kind"] == kind:
        return "wrong_colour"
    if there and there[0]["colour"] == colour:
        return "wrong_kind"
    return "wrong_position"


def write_synthetic(out: str | Path, cfg, images: int, first: int = 0) -> Path:
    """An MME-format directory of `images` synthetic images (cfg's stream from index `first`, one
    yes and one no question each), in subtasks wrong_colour / wrong_kind / wrong_position by the
    "no" question."""
    from dataclasses import replace

    from pargo_dist.data.synthetic import render_scene, synthetic_scene

    cfg = replace(cfg, qa_per_image=2)
    out = Path(out)
    for index in range(first, first + images):
        scene = synthetic_scene(index, cfg)
        no = next(q for q, a in scene["qa"] if a == "no")
        sub = out / no_question_subtask(no, scene["shapes"], cfg.grid)
        (sub / "images").mkdir(parents=True, exist_ok=True)
        (sub / "questions_answers_YN").mkdir(exist_ok=True)
        name = f"synthetic_{index:05d}"
        render_scene(scene, cfg).save(sub / "images" / f"{name}.png")
        lines = [f"{q}\t{a.capitalize()}" for q, a in scene["qa"]]
        (sub / "questions_answers_YN" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
