"""`pargo-dist eval`: run a trained model over held-out captions and yes/no questions, on N ranks.

What it measures
  captions  every sample of an MDS split (default: the recipe's data.eval): the answer tokens'
            mean loss and perplexity (teacher-forced), and a greedy caption scored for detail
            recall against the true one (pargo_dist/evaluation/details.py);
  mme       every question of an MME-format directory (pargo_dist/evaluation/mme.py), answered
            with generate(); `--mme synthetic` writes one from the recipe's held-out stream.

How it runs
  Each rank holds the whole exported model (evaluation is data parallel: no ZeRO, no TP) and
  takes every WORLD_SIZE-th of the items still to do. Results are appended per batch to
  OUT/parts/<task>.rank<R>.jsonl, keyed by item id, so a killed or preempted evaluation
  resumes where it stopped: done ids are read back (and exchanged between ranks, so the split
  of what is left agrees even without a shared filesystem), on any number of ranks. At the
  end rank 0 gathers every result, writes OUT/metrics.json, MME's result files and
  TensorBoard scalars (eval/...) at the checkpoint's step, and prints a table.
  SIGTERM / SIGUSR1 (a preemption) let each rank finish and write its current batch, then the
  evaluation exits with 75 (requeue me), like training; the same command finishes the rest.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pargo_dist.constants import IGNORE_INDEX
from pargo_dist.data.collate import Collator
from pargo_dist.data.prompt import split_prompt_answer
from pargo_dist.data.schema import BadSample
from pargo_dist.errors import UserError
from pargo_dist.runtime.signals import StopSignal

PARTS = "parts"


# ----------------------------------------------------------------------------- the process group


class Ranks:
    """RANK / WORLD_SIZE from the launcher; a gloo group (objects only: every rank has the model)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def close(self) -> None:
        if self.world > 1 and self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()


# ----------------------------------------------------------------------------- resumable results


class Results:
    """One task's results: what every rank has done (files + exchange), what is left, appends."""

    def __init__(self, out: Path, task: str, ranks: Ranks):
        self.dir = out / PARTS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.task, self.ranks = task, ranks
        self.path = self.dir / f"{task}.rank{ranks.rank}.jsonl"
        mine: dict[str, dict] = {}
        for part in sorted(self.dir.glob(f"{task}.rank*.jsonl")):
            for line in part.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short: that item is redone
                    continue
                mine[row["id"]] = row
        self.done: dict[str, dict] = {}
        for rows in ranks.gather(mine):
            self.done.update(rows)

    def todo(self, ids: list[str]) -> list[str]:
        """This rank's share of the ids not done yet (the same split on every rank)."""
        left = [i for i in ids if i not in self.done]
        return left[self.ranks.rank::self.ranks.world]

    def add(self, rows: list[dict]) -> None:
        with open(self.path, "a+b") as f:
            torn = False  # a kill mid-write left a partial last line: start ours on a new one
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((("\n" if torn else "") + "".join(json.dumps(r) + "\n" for r in rows)).encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.update({r["id"]: r for r in rows})

    def gathered(self, ids: list[str]) -> list[dict]:
        """Every rank's results for `ids`, in the order of `ids` (call on all ranks)."""
        merged: dict[str, dict] = {}
        for rows in self.ranks.gather({i: self.done[i] for i in ids if i in self.done}):
            merged.update(rows)
        missing = [i for i in ids if i not in merged]
        if missing:
            raise RuntimeError(f"{self.task}: no result for {len(missing)} items (e.g. {missing[:3]})")
        return [merged[i] for i in ids]


# ----------------------------------------------------------------------------- batches


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Evaluator:
    """A loaded model plus how to prompt it; the per-task loops."""

    def __init__(self, model, tokenizer, cfg, device: torch.device, batch_size: int, generate_kwargs: dict):
        from pargo_dist import build
        from pargo_dist.data.prompt import PromptBuilder

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device, self.batch_size, self.generate_kwargs = device, batch_size, generate_kwargs
        self.prompt = PromptBuilder(tokenizer, build.visual_tokens(cfg, model), max_len=10**6)
        self.pixels = build.image_processor(cfg)
        self.collate = Collator(pad_id=tokenizer.pad_token_id, padding_side="left",  # left: generation appends
                                pixel_mean=tuple(self.pixels.mean), pixel_std=tuple(self.pixels.std))

    def _generate(self, prompts: list[list[int]], pixels: torch.Tensor, crops: list[int] | None = None) -> list[str]:
        from pargo_dist.evaluation.generate import generate_texts

        return generate_texts(self.model, self.tokenizer, prompts, pixels, self.device, image_crops=crops,
                              **self.generate_kwargs)

    def _loss_sums(self, batch) -> list[tuple[float, int]]:
        """Per sample of a collated batch: summed cross-entropy of its answer tokens, and how many there are."""
        logits = self.model(input_ids=batch.input_ids.to(self.device),
                            pixel_values=batch.to(self.device).pixels().to(self.model.dtype),
                            attention_mask=batch.attention_mask.to(self.device),
                            image_crops=batch.image_crops).logits.float()
        targets = batch.labels[:, 1:].to(self.device)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(1)
        return [(float(s), int(c)) for s, c in zip(losses.sum(1).tolist(), counts.tolist())]

    def caption_rows(self, examples: list[dict], generate: bool) -> list[dict]:
        """Per sample: its answer's loss sum and token count, the true answer, and (if `generate`)
        the greedy one."""
        batch = self.collate(examples)
        rows = []
        sums = self._loss_sums(batch)
        prompts, truths = [], []
        for e in examples:
            prompt, answer = split_prompt_answer(e["input_ids"], e["labels"])
            prompts.append(prompt)
            truths.append(self.tokenizer.decode(answer, skip_special_tokens=True).strip())
        generated = self._generate(prompts, batch.pixels(), batch.image_crops) if generate else [None] * len(examples)
        for e, (loss_sum, tokens), truth, text in zip(examples, sums, truths, generated):
            rows.append({"sample": e["id"], "loss_sum": loss_sum, "tokens": tokens, "truth": truth, "generated": text})
        return rows

    def question_prompt(self, question: str, crops: int = 1) -> list[int]:
        return self.prompt.generation_prompt(question, crops)

    def answer_rows(self, questions: list) -> list[dict]:
        from PIL import Image

        views = [self.pixels.views(Image.open(q.image).convert("RGB")) for q in questions]
        crops = [len(v) for v in views]
        prompts = [self.question_prompt(q.question, c) for q, c in zip(questions, crops)]
        answers = self._generate(prompts, torch.cat(views), crops if any(c != 1 for c in crops) else None)
        return [{"id": q.key, "subtask": q.subtask, "image": q.image.name, "question": q.question,
                 "answer": q.answer, "prediction": a} for q, a in zip(questions, answers)]


# ----------------------------------------------------------------------------- the tasks


def _progress(total: int, desc: str, rank: int):
    return tqdm(total=total, desc=desc, disable=rank != 0 or total == 0, dynamic_ncols=True, file=sys.stdout)


class Interrupted(Exception):
    """SIGTERM / SIGUSR1 arrived: this rank's finished batches are on disk, the rest is for the rerun."""


def _run_task(results: Results, items: dict[str, Any], rows_of: Callable[[list], list[dict]], batch: int,
              desc: str, stop: StopSignal | None = None) -> None:
    todo = results.todo(list(items))
    with _progress(len(todo), desc, results.ranks.rank) as bar:
        for chunk in _batches(todo, batch):
            results.add(rows_of([items[i] for i in chunk]))
            bar.update(len(chunk))
            if stop is not None and stop.requested:
                raise Interrupted(f"received signal {stop.signal}")


def caption_metrics(rows: list[dict]) -> dict[str, float]:
    from pargo_dist.evaluation.details import aggregate, score_caption

    scored = [r for r in rows if "skipped" not in r]
    tokens = sum(r["tokens"] for r in scored)
    loss = sum(r["loss_sum"] for r in scored) / max(tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "samples": float(len(scored)),
           "skipped": float(len(rows) - len(scored))}
    if scored and scored[0]["generated"] is not None:
        details = aggregate([score_caption(r["truth"], r["generated"]) for r in scored])
        out.update(details)
    return out


def open_dataset(path: str, evaluator: Evaluator, cfg):
    """The MDS split at `path` (a local dir or a remote such as s3://...), unshuffled."""
    from dataclasses import replace

    from pargo_dist.data.dataset import DataConfig, ParGoDataset

    base = cfg.data.eval or DataConfig()
    remote = path if "://" in path else None
    data = replace(base, remote=remote, local=None if remote else path, shuffle=False)
    if remote is None and not (Path(path) / "index.json").exists():
        raise UserError(f"--data {path}: no MDS index.json there (a `pargo-dist convert` or `synth` output)")
    return ParGoDataset(data, tokenizer=evaluator.tokenizer, image_processor=evaluator.pixels,
                        num_image_tokens=evaluator.prompt.tokens_per_crops, batch_size=1)


def evaluate_captions(evaluator: Evaluator, dataset, out: Path, ranks: Ranks, limit: int | None,
                      generate: bool, stop: StopSignal | None = None) -> dict[str, float]:
    n = dataset.num_samples if limit is None else min(limit, dataset.num_samples)
    keys = [str(i) for i in range(n)]  # the split's own order: stable across runs and rank counts
    results = Results(out, "captions", ranks)

    def rows_of(indices: list[int]) -> list[dict]:
        good, rows = [], []
        for index in indices:
            raw = dataset.get_item(index)
            try:
                good.append({**dataset.encode(raw), "key": str(index)})
            except BadSample as err:  # counted and named, never fatal
                rows.append({"id": str(index), "sample": raw.get("id"), "skipped": err.reason})
        if good:
            for e, row in zip(good, evaluator.caption_rows(good, generate)):
                rows.append({"id": e["key"], **row})
        return rows

    _run_task(results, {k: int(k) for k in keys}, rows_of, evaluator.batch_size, "eval captions", stop)
    rows = results.gathered(keys)
    if ranks.rank == 0:
        skipped = [r for r in rows if "skipped" in r]
        for r in skipped[:10]:
            print(f"skipped sample {r['sample']} (index {r['id']}): {r['skipped']}", flush=True)
        with open(out / "captions.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return caption_metrics(rows)


def evaluate_mme(evaluator: Evaluator, root: Path, out: Path, ranks: Ranks, limit: int | None,
                 stop: StopSignal | None = None) -> dict[str, float]:
    from pargo_dist.evaluation import mme

    # image order first, so a --limit takes both questions of an image and spans the subtasks
    questions = sorted(mme.load_benchmark(root), key=lambda q: (q.image.name, q.subtask))[:limit]
    results = Results(out, "mme", ranks)
    items = {q.key: q for q in questions}
    _run_task(results, items, evaluator.answer_rows, evaluator.batch_size, "eval mme", stop)
    rows = results.gathered(list(items))
    if ranks.rank == 0:
        mme.write_results(rows, out / "mme_results")
    return mme.score(rows)
