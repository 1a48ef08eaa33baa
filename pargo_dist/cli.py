"""`pargo-dist`: the command line. Subcommands arrive with their issues (train, convert, ...).

    pargo-dist model --preset paper          # parameter counts and visual tokens, no weights
    pargo-dist model --preset tiny --run     # also build it and run one forward + generate
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pargo-dist",
        description="Train ParGo multimodal LLMs with DeepSpeed ZeRO-3 or Megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model = sub.add_parser("model", help="describe a model preset: parameters per part, visual tokens",
                           description=cmd_model.__doc__ or __doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    model.add_argument("--preset", default="tiny", help="tiny | paper (default: tiny)")
    model.add_argument("--projector", choices=["pargo", "qformer", "mlp"], help="swap the projector type")
    model.add_argument("--run", action="store_true", help="build real weights and run forward + generate")
    model.set_defaults(func=cmd_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # configuration errors: one clear line, no traceback
        print(f"pargo-dist {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
