"""`pargo-dist`: the command line.

    pargo-dist model --preset paper          # parameter counts and visual tokens, no weights
    pargo-dist model --preset tiny --run     # also build it and run one forward + generate
    pargo-dist synth --out data/synth --num-samples 2000 --held-out 64
    pargo-dist convert captions.jsonl --image-root imgs/ --out s3://bucket/pretrain --workers 8

    pargo-dist train recipes/tiny-cpu.yaml --nproc 2 optim.lr=3e-4 backend.zero_stage=2
    pargo-dist submit recipes/x.yaml --nodes 4 --gpus-per-node 8 --partition gpu [--dry-run]
    pargo-dist plan recipes/llama3-8b-stage2.yaml --gpus 64 --gpu-mem 80 --fit
    pargo-dist export runs/tiny-cpu --out runs/tiny-cpu/export
    pargo-dist generate runs/tiny-cpu/export --held-out 0
    pargo-dist eval runs/tiny-cpu --nproc 2                 # held-out loss, detail recall, yes/no (MME)
    pargo-dist report runs/tiny-cpu                         # PNG plots from TensorBoard logs
    pargo-dist doctor recipes/paper-stage1-align.yaml       # before a job: GPUs, versions, data, weights, disk

Exit codes: 0 done; 1 a failure, with its traceback (a bug, a damaged input, an OOM: on the
rank where it happened); 2 something to fix, said in one line (a bad recipe or argument, a
missing or bad input file, an output that already exists); 75 saved after SIGTERM/SIGUSR1
(requeue me); 124 the hang detector ended the run (a rank made no progress for
train.hang_timeout_s).
"""

from __future__ import annotations

import argparse
import os
import sys

from pargo_dist.errors import TryAgainLater, UserError


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def cmd_model(args: argparse.Namespace) -> int:
    import torch

    from pargo_dist.constants import PARTS, STAGES
    from pargo_dist.models import ParGoConfig, ParGoForConditionalGeneration, insert_image_tokens
    from pargo_dist.models.presets import preset

    values = preset(args.preset)
    if args.projector:
        values["projector"] = {**values["projector"], "type": args.projector}
    config = ParGoConfig(**values)
    device = "cpu" if args.run else "meta"  # meta: shapes and counts without allocating weights
    with torch.device(device):
        model = ParGoForConditionalGeneration(config)
    counts = {p: _count(getattr(model, p)) for p in PARTS}
    proj = config.projector_config
    print(f"ParGo model '{args.preset}' ({proj.type} projector)")
    print(f"{'part':<16}{'parameters':>16}  trains in")
    for p in PARTS:
        stages = ", ".join(s for s, mods in STAGES.items() if p in mods)
        print(f"{p:<16}{counts[p]:>16,}  {stages}")
    print(f"{'total':<16}{sum(counts.values()):>16,}")
    tower = model.vision_tower
    print(f"image {tower.image_size}px -> {tower.grid[0]}x{tower.grid[1]} patches of width {tower.width}"
          f" -> {model.num_image_tokens()} visual tokens of width {config.text_config.hidden_size}")
    if args.run:
        torch.manual_seed(0)
        model.eval()
        ids = torch.tensor([insert_image_tokens([1, config.image_token_id, 2], config.image_token_id,
                                                model.num_image_tokens())])
        px = torch.randn(1, 3, tower.image_size, tower.image_size)
        logits = model(input_ids=ids, pixel_values=px).logits
        new = model.generate(ids, px, max_new_tokens=8, do_sample=False, pad_token_id=0)
        print(f"forward: input_ids {tuple(ids.shape)} -> logits {tuple(logits.shape)}")
        print(f"generate (random weights, 8 tokens): {new[0].tolist()}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pargo_dist.data.synthetic import SyntheticConfig, write_splits

    cfg = SyntheticConfig(num_samples=args.num_samples, image_size=args.image_size, grid=args.grid,
                          seed=args.seed, image_format=args.image_format)
    summaries = write_splits(args.out, cfg, args.held_out, kind=args.kind, progress=not args.no_progress)
    for name, summary in summaries.items():
        print(f"[{name}] " + summary.format().replace("converted", "wrote", 1))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pargo_dist.data.convert import run

    return run(args)


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from pargo_dist.config import DEFAULT_RECIPE
    from pargo_dist.launch.node import prepare_training

    if args.recipe and "=" in args.recipe:  # no recipe named: the first word is an override
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if args.torchrun:
        return _train_under_torchrun(args)
    ranks = int(os.environ.get("WORLD_SIZE", args.nproc)) if "LOCAL_RANK" in os.environ else args.nproc
    cfg = prepare_training(args.recipe, args.overrides, ranks)  # fails here, before any rank starts
    from pargo_dist.runtime import torchrun

    if torchrun.under_torchrun():
        refused = _torchrun_attempt(cfg)
        if refused is not None:
            return refused
    if "LOCAL_RANK" not in os.environ and args.nproc > 1:
        from pargo_dist.launch.node import launch
        from pargo_dist.launch.restarts import restart_policy

        return launch(args.nproc, [args.recipe or str(DEFAULT_RECIPE), *args.overrides], restarts=restart_policy(cfg))
    from pargo_dist.runtime.rank_env import single_process_env

    single_process_env()
    from pargo_dist.train.run import train

    return train(cfg)


def _train_under_torchrun(args: argparse.Namespace) -> int:
    """`train --torchrun`: this node's ranks under torchrun's agent (pargo_dist/launch/torchrun.py)."""
    from pargo_dist.config import DEFAULT_RECIPE
    from pargo_dist.launch.node import prepare_training
    from pargo_dist.launch.torchrun import run_under_torchrun

    if "LOCAL_RANK" in os.environ:
        raise UserError("--torchrun starts torchrun, which starts the ranks: a rank cannot (drop --torchrun "
                        "from the command torchrun runs)")
    nproc = int(os.environ.get("PET_NPROC_PER_NODE") or args.nproc)
    nnodes = int(os.environ.get("PET_NNODES", "1").split(":")[-1])
    cfg = prepare_training(args.recipe, args.overrides, nproc * nnodes)  # fails here, before torchrun starts
    return run_under_torchrun(nproc, [args.recipe or str(DEFAULT_RECIPE), *args.overrides], cfg.run.max_restarts)


def _torchrun_attempt(cfg) -> int | None:
    """In a rank started by torchrun: record this attempt's ending where the next attempt (and
    `train --torchrun`) reads it; and do not train when our restart policy would not have
    restarted after an earlier attempt (a bad input, the same failure at the same step again):
    returns that attempt's code to exit with, spending torchrun's restart in seconds."""
    from pargo_dist.launch.restarts import replay
    from pargo_dist.runtime import torchrun
    from pargo_dist.runtime.exits import FAILURE_DIR_ENV, attempt_outcome

    here = torchrun.records_dir()
    here.mkdir(parents=True, exist_ok=True)
    os.environ[FAILURE_DIR_ENV] = str(here)
    first = os.environ.get("RANK") == "0"
    n = torchrun.attempt()
    if first and n == 0:
        print(f"pargo-dist train: under torchrun, whose agent restarts the ranks (--max-restarts "
              f"{torchrun.max_restarts()}); run.max_restarts={cfg.run.max_restarts} is not used by a second launcher",
              flush=True)
    if n == 0:
        return None
    code, why = replay([attempt_outcome(torchrun.records_dir(k)) for k in range(n)], torchrun.max_restarts())
    if why is None:
        if first:
            print(f"pargo-dist train: torchrun's restart {n} of at most {torchrun.max_restarts()}: resuming from "
                  "the newest complete checkpoint", flush=True)
        return None
    if os.environ.get("LOCAL_RANK") == "0":
        print(f"pargo-dist train: not training in torchrun's attempt {n}: {why}; exiting {code}",
              file=sys.stderr, flush=True)
    return code


def cmd_export(args: argparse.Namespace) -> int:
    from pargo_dist.export.hf import export

    out = export(args.checkpoint, args.out, adapters_only=args.adapters_only, max_shard_bytes=args.max_shard_size,
                 dtype=args.dtype)
    if args.adapters_only:
        print(f"exported {args.checkpoint} -> {out} (LoRA adapters in peft's format, and the projector)")
    else:
        print(f"exported {args.checkpoint} -> {out} (without pargo_dist: AutoProcessor and "
              "AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True))")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from pargo_dist.evaluation.generate import caption_image, held_out_image, load_exported

    model, tokenizer, cfg = load_exported(args.model)
    truth = None
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    else:
        image, truth = held_out_image(cfg, args.held_out)
    torch.manual_seed(0)
    text = caption_image(model, tokenizer, cfg, image, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    print(f"generated: {text}")
    if truth is not None:
        print(f"truth:     {truth}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import os

    if "LOCAL_RANK" not in os.environ and args.nproc > 1:
        from pargo_dist.launch.node import launch

        return launch(args.nproc, args.argv, command="eval")  # ranks see LOCAL_RANK, ignore --nproc
    from pargo_dist.evaluation.command import run

    return run(args)


def _parser(name: str, description: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"pargo-dist {name}", description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _module_parser(name: str, module, func=None) -> argparse.ArgumentParser:
    """A command whose --help text, flags and entry point live in its module (__doc__,
    add_arguments, run), so the module documents itself in one place."""
    parser = _parser(name, module.__doc__)
    module.add_arguments(parser)
    parser.set_defaults(func=func or module.run)
    return parser


def _model_parser() -> argparse.ArgumentParser:
    model = _parser("model", "Describe a model preset: parameters per part, which stage trains them, visual tokens.")
    model.add_argument("--preset", default="tiny", help="tiny | paper (default: tiny)")
    model.add_argument("--projector", choices=["pargo", "qformer", "mlp"], help="swap the projector type")
    model.add_argument("--run", action="store_true", help="build real weights and run forward + generate")
    model.set_defaults(func=cmd_model)
    return model


def _synth_parser() -> argparse.ArgumentParser:
    synth = _parser("synth", "Shapes in grid cells with captions that name every shape (colour, kind, position) "
                    "and yes/no questions about details; deterministic from --seed. Writes OUT/train and, with "
                    "--held-out N, OUT/val (a disjoint random stream).")
    synth.add_argument("--out", required=True, help="directory or remote (s3://bucket/prefix)")
    synth.add_argument("--num-samples", type=int, default=2000)
    synth.add_argument("--held-out", type=int, default=0, help="samples in the held-out OUT/val split")
    synth.add_argument("--image-size", type=int, default=224)
    synth.add_argument("--grid", type=int, default=3, help="cells per side (2-4)")
    synth.add_argument("--kind", choices=["caption", "qa", "mixed"], default="caption",
                       help="caption: stage-1 captions; qa: yes/no conversations; mixed: alternate")
    synth.add_argument("--image-format", choices=["png", "jpeg"], default="png")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(func=cmd_synth)
    return synth


def _convert_parser() -> argparse.ArgumentParser:
    from pargo_dist.data.convert import add_arguments

    convert = _parser("convert", "Convert JSONL / JSON / LLaVA conversation JSON / parquet / webdataset tar into MDS "
                      "shards. Bad samples are skipped, counted by reason and listed in a report; the run never "
                      "stops for one.")
    add_arguments(convert)
    convert.set_defaults(func=cmd_convert)
    return convert


def _train_parser() -> argparse.ArgumentParser:
    train = _parser("train", "Train a recipe. RECIPE defaults to the embedded tiny-cpu recipe; overrides are dotted "
                    "key=value pairs (train.steps=50 optim.lr=1e-4), before or after the flags. Resumes from the "
                    "newest complete checkpoint in run.dir unless checkpoint.resume=none.",
                    epilog="exit codes: 0 done; 1 a rank failed (its traceback is above); 2 a bad recipe or input "
                    "(one line says what to change); 75 saved after SIGTERM/SIGUSR1, requeue me; 124 the hang "
                    "detector ended the run")
    train.add_argument("recipe", nargs="?", help="recipe YAML (default: the embedded tiny-cpu recipe)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--nproc", type=int, default=1, help="ranks on this machine (one per GPU)")
    train.add_argument("--torchrun", action="store_true",
                       help="start this node's ranks with torchrun's elastic agent instead of our launcher (what a "
                       "Kubernetes pod runs: torchrun's options from PET_* variables, --standalone without them; "
                       "its --max-restarts from run.max_restarts) and exit with our codes, not torchrun's 1 "
                       "(docs/kubernetes.md)")
    train.set_defaults(func=cmd_train)
    return train


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(text: str) -> int:
    """'5GB' -> 5e9, '2GiB' -> 2 * 2**30, '1000' -> 1000 (the units of transformers' max_shard_size)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write it as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def _export_parser() -> argparse.ArgumentParser:
    export = _parser("export", "A checkpoint of any backend, stage and rank count -> one HF directory that "
                     "ParGoForConditionalGeneration.from_pretrained loads on one process, with its tokenizer "
                     "and recipe.")
    export.add_argument("checkpoint", help="a run dir (newest complete checkpoint), a checkpoint dir, or a run's "
                        "checkpoint.remote URL (s3://bucket/prefix: its newest complete checkpoint, downloaded)")
    export.add_argument("--out", required=True)
    export.add_argument("--adapters-only", action="store_true",
                        help="LoRA runs: write the LLM adapters (peft format) and the projector instead of "
                        "merging the adapters into the LLM weights")
    export.add_argument("--max-shard-size", type=byte_size, default="5GB", metavar="SIZE",
                        help="largest safetensors file, as 5GB, 500MB, 2GiB (default 5GB); larger models are "
                        "written in several, with the index transformers reads")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="precision of the written weights (default fp32, what the optimizer held; bf16 "
                        "halves the files, as the hub ships models)")
    export.set_defaults(func=cmd_export)
    return export


def _generate_parser() -> argparse.ArgumentParser:
    generate = _parser("generate", "Caption an image with an exported model (one process).")
    generate.add_argument("model", help="an exported directory (pargo-dist export)")
    generate.add_argument("--image", help="image file; default: a held-out synthetic image")
    generate.add_argument("--held-out", type=int, default=0, help="index of the held-out synthetic image")
    generate.add_argument("--num-beams", type=int, default=1)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.set_defaults(func=cmd_generate)
    return generate


def _submit_parser() -> argparse.ArgumentParser:
    from pargo_dist.launch import submit

    return _module_parser("submit", submit)


def _plan_parser() -> argparse.ArgumentParser:
    from pargo_dist import plan

    return _module_parser("plan", plan)


def _eval_parser() -> argparse.ArgumentParser:
    from pargo_dist.evaluation import command as evaluation

    return _module_parser("eval", evaluation, func=cmd_eval)


def _report_parser() -> argparse.ArgumentParser:
    from pargo_dist.observe import report

    return _module_parser("report", report)


def _doctor_parser() -> argparse.ArgumentParser:
    from pargo_dist.launch import doctor

    return _module_parser("doctor", doctor)


# name -> (one line for `pargo-dist --help`, the command's own parser). Each command builds only
# its own parser, so a launcher (`train --nproc 8`) imports what train needs, not the planner's torch.
COMMANDS = {
    "model": ("describe a model preset: parameters per part, visual tokens", _model_parser),
    "synth": ("write the built-in synthetic detail-caption dataset as MDS shards", _synth_parser),
    "convert": ("caption / conversation files -> MDS shards (local or s3://)", _convert_parser),
    "train": ("train (or resume) a recipe with DeepSpeed ZeRO or megatron-core", _train_parser),
    "submit": ("write the sbatch script for a recipe and submit it to SLURM", _submit_parser),
    "plan": ("per-GPU memory and expected speed of a recipe on N GPUs (no GPU needed)", _plan_parser),
    "export": ("checkpoint -> one HF directory (from_pretrained on one process)", _export_parser),
    "generate": ("caption an image with an exported model", _generate_parser),
    "eval": ("held-out loss, detail recall of captions, MME yes/no; N ranks, resumable", _eval_parser),
    "report": ("PNG plots of loss, throughput and eval results from TensorBoard logs", _report_parser),
    "doctor": ("check a node and a recipe before a job: GPUs, versions, shm, data, weights, disk", _doctor_parser),
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command (`pargo-dist NAME ...`)."""
    return COMMANDS[name][1]()


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {line}" for name, (line, _) in COMMANDS.items())
    top = argparse.ArgumentParser(
        prog="pargo-dist", usage="pargo-dist COMMAND [ARGS...]",
        description="Train ParGo multimodal LLMs with DeepSpeed ZeRO-3 or Megatron-core.\n" + __doc__.split("\n", 1)[1],
        epilog=f"commands:\n{listing}\n\n`pargo-dist COMMAND --help` explains a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1])  # --help, or the error naming the valid commands
        return 2
    name = argv[0]
    if name in ("train", "eval"):  # SIGTERM / SIGUSR1 stay pending until the launcher or loop handles them
        from pargo_dist.runtime.signals import hold_signals

        hold_signals()
    args = command_parser(name).parse_intermixed_args(argv[1:])  # flags and key=value overrides in any order
    args.command, args.argv = name, argv[1:]  # argv: what a launcher passes on to its ranks (`eval --nproc`)
    try:
        code = args.func(args)
    except UserError as err:  # something the user can fix: one line. Anything else keeps its traceback.
        print(f"pargo-dist {name}: error: {err}", file=sys.stderr)
        code = 2
    except TryAgainLater as err:  # outside the job (an unreachable store): requeue
        from pargo_dist.runtime.exits import REQUEUE_EXIT

        print(f"pargo-dist {name}: {err}; exiting with {REQUEUE_EXIT} for requeue", file=sys.stderr)
        code = REQUEUE_EXIT
    except BaseException:  # a one-rank run's error, with its traceback
        if name == "train" and "LOCAL_RANK" in os.environ:
            from pargo_dist.runtime.exits import record_exit

            record_exit(1)
        raise
    if name == "train" and "LOCAL_RANK" in os.environ:  # a rank: how it ended, for its launcher
        from pargo_dist.runtime.exits import record_exit

        record_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
