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

Exit codes of train: 0 done, 75 saved after SIGTERM/SIGUSR1 (requeue me), 2 bad recipe,
124 the hang detector ended the run (a rank made no progress for train.hang_timeout_s).
"""

from __future__ import annotations

import argparse
import sys


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def cmd_model(args: argparse.Namespace) -> int:
    import torch

    from pargo_dist.models import STAGES, ParGoConfig, ParGoForConditionalGeneration, insert_image_tokens
    from pargo_dist.models.presets import preset

    values = preset(args.preset)
    if args.projector:
        values["projector"] = {**values["projector"], "type": args.projector}
    config = ParGoConfig(**values)
    device = "cpu" if args.run else "meta"  # meta: shapes and counts without allocating weights
    with torch.device(device):
        model = ParGoForConditionalGeneration(config)
    parts = ["vision_tower", "projector", "language_model"]
    counts = {p: _count(getattr(model, p)) for p in parts}
    proj = config.projector_config
    print(f"ParGo model '{args.preset}' ({proj.type} projector)")
    print(f"{'part':<16}{'parameters':>16}  trains in")
    for p in parts:
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

    from pargo_dist.config import DEFAULT_RECIPE, load_config

    if args.recipe and "=" in args.recipe:  # no recipe named: the first word is an override
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    cfg = load_config(args.recipe, args.overrides)  # fails here, before any rank starts
    if "LOCAL_RANK" not in os.environ and args.nproc > 1:
        from pargo_dist.launch import launch

        return launch(args.nproc, [args.recipe or str(DEFAULT_RECIPE), *args.overrides])
    from pargo_dist.launch import single_process_env

    single_process_env()
    from pargo_dist.train import train

    return train(cfg)


def cmd_export(args: argparse.Namespace) -> int:
    from pargo_dist.export import export

    out = export(args.checkpoint, args.out, adapters_only=args.adapters_only)
    print(f"exported {args.checkpoint} -> {out} (load with ParGoForConditionalGeneration.from_pretrained)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from pargo_dist.generate import caption_image, held_out_image, load_exported

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
        from pargo_dist.launch import launch

        return launch(args.nproc, args.argv, command="eval")  # ranks see LOCAL_RANK, ignore --nproc
    from pargo_dist.evaluation.command import run

    return run(args)


def _module_command(sub, name: str, module, help: str, func=None) -> argparse.ArgumentParser:
    """A subcommand whose --help text, flags and entry point live in its module (__doc__,
    add_arguments, run), so the module documents itself in one place."""
    parser = sub.add_parser(name, help=help, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(func=func or module.run)
    return parser


def _add_model(sub) -> None:
    model = sub.add_parser("model", help="describe a model preset: parameters per part, visual tokens",
                           description=cmd_model.__doc__ or __doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    model.add_argument("--preset", default="tiny", help="tiny | paper (default: tiny)")
    model.add_argument("--projector", choices=["pargo", "qformer", "mlp"], help="swap the projector type")
    model.add_argument("--run", action="store_true", help="build real weights and run forward + generate")
    model.set_defaults(func=cmd_model)


def _add_synth(sub) -> None:
    synth = sub.add_parser("synth", help="write the built-in synthetic detail-caption dataset as MDS shards",
                           description="Shapes in grid cells with captions that name every shape (colour, "
                           "kind, position) and yes/no questions about details; deterministic from --seed. "
                           "Writes OUT/train and, with --held-out N, OUT/val (a disjoint random stream).")
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


def _add_convert(sub) -> None:
    from pargo_dist.data.convert import add_arguments

    convert = sub.add_parser("convert", help="caption / conversation files -> MDS shards (local or s3://)",
                             description=("Convert JSONL / JSON / LLaVA conversation JSON / parquet / webdataset "
                                          "tar into MDS shards. Bad samples are skipped, counted by reason and "
                                          "listed in a report; the run never stops for one."))
    add_arguments(convert)
    convert.set_defaults(func=cmd_convert)


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train (or resume) a recipe with DeepSpeed ZeRO",
                           description="Train a recipe. RECIPE defaults to the embedded recipes/tiny-cpu.yaml; "
                           "overrides are dotted key=value pairs (train.steps=50 optim.lr=1e-4). Resumes from the "
                           "newest complete checkpoint in run.dir unless checkpoint.resume=none. Exit 75 after "
                           "SIGTERM/SIGUSR1 means: checkpoint saved, requeue me.")
    train.add_argument("recipe", nargs="?", help="recipe YAML (default: recipes/tiny-cpu.yaml)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun)")
    train.set_defaults(func=cmd_train)


def _add_submit(sub) -> None:
    from pargo_dist import submit

    _module_command(sub, "submit", submit, "write the sbatch script for a recipe and submit it to SLURM")


def _add_plan(sub) -> None:
    from pargo_dist import plan

    _module_command(sub, "plan", plan, "per-GPU memory and expected speed of a recipe on N GPUs (no GPU needed)")


def _add_export(sub) -> None:
    export = sub.add_parser("export", help="checkpoint -> one HF directory (from_pretrained on one process)")
    export.add_argument("checkpoint", help="a run dir (newest complete checkpoint) or a checkpoint dir")
    export.add_argument("--out", required=True)
    export.add_argument("--adapters-only", action="store_true",
                        help="LoRA runs: write the LLM adapters (peft format) and the projector instead of "
                        "merging the adapters into the LLM weights")
    export.set_defaults(func=cmd_export)


def _add_generate(sub) -> None:
    generate = sub.add_parser("generate", help="caption an image with an exported model")
    generate.add_argument("model", help="an exported directory (pargo-dist export)")
    generate.add_argument("--image", help="image file; default: a held-out synthetic image")
    generate.add_argument("--held-out", type=int, default=0, help="index of the held-out synthetic image")
    generate.add_argument("--num-beams", type=int, default=1)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.set_defaults(func=cmd_generate)


def _add_eval(sub) -> None:
    from pargo_dist.evaluation import command as evaluation

    _module_command(sub, "eval", evaluation, "held-out loss, detail recall of captions, MME yes/no; N ranks, resumable",
                    func=cmd_eval)


def _add_report(sub) -> None:
    from pargo_dist import report

    _module_command(sub, "report", report, "PNG plots of loss, throughput and eval results from TensorBoard logs")


COMMANDS = {"model": _add_model, "synth": _add_synth, "convert": _add_convert, "train": _add_train,
            "submit": _add_submit, "plan": _add_plan, "export": _add_export, "generate": _add_generate,
            "eval": _add_eval, "report": _add_report}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `command`, only that subcommand's parser. A launcher (`train --nproc
    8`) then imports what train needs, not the planner's torch: it starts its ranks seconds sooner."""
    parser = argparse.ArgumentParser(
        prog="pargo-dist",
        description="Train ParGo multimodal LLMs with DeepSpeed ZeRO-3 or Megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add in COMMANDS.items():
        if command is None or command not in COMMANDS or name == command:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["eval"]):  # SIGTERM / SIGUSR1 stay pending until the launcher or loop handles them
        from pargo_dist.launch import hold_signals

        hold_signals()
    if argv[:1] in (["train"], ["submit"], ["plan"]):  # flags first: key=value overrides on either side
        flags, rest, i = [], [], 1
        while i < len(argv):
            if argv[i].startswith("--"):
                takes_value = "=" not in argv[i] and argv[i] not in ("--help", "--dry-run", "--fit")
                flags += argv[i:i + 1 + takes_value]
                i += 1 + takes_value
            else:
                rest.append(argv[i])
                i += 1
        argv = [argv[0], *flags, *rest]
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    args.argv = argv[1:]  # what a launcher passes on to its ranks (`eval --nproc`)
    try:
        return args.func(args)
    except ValueError as err:  # configuration errors: one clear line, no traceback
        print(f"pargo-dist {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
