"""`spade ...` subcommands: each parses its arguments and calls into the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spade.errors import SpadeError

EXAMPLES = {
    "presets": """examples:
  spade presets
""",
    "convert-official": """examples:
  spade convert-official --preset coco --generator checkpoints/coco_pretrained/latest_net_G.pth --output coco.pt
  spade convert-official --preset coco --generator latest_net_G.pth --encoder latest_net_E.pth --output coco_vae.pt
  spade convert-official --preset cityscapes --generator latest_net_G.pth --discriminator latest_net_D.pth \\
      --output cityscapes.pt
""",
    "train": """examples:
  spade train                                    # params.yaml in this folder, or the built-in defaults
  spade train --params params.yaml --set train.iterations=2000 --set model.ngf=32
  spade train --no-vgg-loss --batch-size 4 --out runs/try1
  spade train --resume                           # continue from the latest checkpoint of train.out_dir
  spade train --resume s3://bucket/runs/coco/checkpoints
  torchrun --nproc-per-node 4 -m spade train --params params.yaml   # distributed data parallel
""",
    "demo": """examples:
  spade demo                                     # what `make demo` runs, with ./params.yaml
  spade demo --set train.iterations=200          # quicker, rougher
""",
    "data synth": """examples:
  spade data synth --out data/builtin --count 300 --size 64
  spade data synth --out /tmp/scenes --count 1000 --size 128 --seed 7
""",
    "synthesize": """examples:
  # one COCO-Stuff label map (instance edges from its instance map)
  spade synthesize --checkpoint coco.pt --label val_label/000000000139.png \\
      --instance val_inst/000000000139.png --output out.png
  # a whole folder, files paired by stem, with a progress bar
  spade synthesize --checkpoint coco.pt --label val_label --instance val_inst --output results/
  # multi-modal: different seeds give different images; --style copies a photo's look
  spade synthesize --checkpoint coco_vae.pt --label map.png --seed 3 --output seed3.png
  spade synthesize --checkpoint coco_vae.pt --label map.png --style beach.jpg --output styled.png
""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spade",
        description="SPADE / GauGAN semantic image synthesis: label map in, photo out.",
        epilog="Run 'spade COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    add("presets", "List the named presets (label classes, resolution, preprocessing).")

    p = add("train", "Train a SPADE model with the settings of params.yaml (overridable here).")
    p.add_argument("--params", type=Path, help="settings file (default: ./params.yaml when present)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. train.iterations=500 (repeatable)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="LOCATION",
        help="continue from the latest checkpoint (in LOCATION: a folder, s3://bucket/prefix or a file; "
        "default: the run's checkpoint folder); starts fresh when there is none",
    )
    p.add_argument("--no-vgg-loss", action="store_true", help="train without the VGG19 perceptual loss")
    p.add_argument("--vgg-weights", help="path of vgg19-dcbb9e9d.pth (default: the torch hub cache)")
    p.add_argument("--iterations", type=int, help="same as --set train.iterations=N")
    p.add_argument("--batch-size", type=int, help="global batch size (same as --set train.batch_size=N)")
    p.add_argument("--out", help="output folder (same as --set train.out_dir=DIR)")
    p.add_argument("--data", help="dataset root (same as --set data.root=DIR)")
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16"), help="same as --set train.precision=")
    p.add_argument("--device", help="cpu, cuda or auto (same as --set train.device=)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable or unpaired files instead of failing")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    p = add("demo", "Built-in landscapes -> train a small model -> synthesize a validation grid (all local).")
    p.add_argument("--params", type=Path, help="settings file (default: ./params.yaml when present)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    data = sub.add_parser("data", help="Dataset tools (the built-in procedural dataset).")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser(
        "synth",
        help="Write the built-in procedural landscape dataset.",
        description="Write the built-in procedural landscape dataset (custom layout, with classes.txt).",
        epilog=EXAMPLES["data synth"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--count", type=int, default=300, help="training scenes (default 300)")
    p.add_argument("--val-count", type=int, help="validation scenes (default count / 10, at least 8)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels, a multiple of 16 (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made with other settings")

    p = add("convert-official", "Convert the authors' published checkpoint files into a project checkpoint.")
    p.add_argument("--preset", required=True, help="coco, ade20k or cityscapes")
    p.add_argument("--generator", required=True, type=Path, help="latest_net_G.pth")
    p.add_argument("--encoder", type=Path, help="latest_net_E.pth of a multi-modal (VAE) model")
    p.add_argument("--discriminator", type=Path, help="latest_net_D.pth, kept for fine-tuning")
    p.add_argument("--output", required=True, type=Path, help="project checkpoint to write (.pt)")

    p = add("synthesize", "Synthesize images from label maps with a project checkpoint.")
    p.add_argument("--checkpoint", required=True, type=Path, help="project checkpoint (.pt)")
    p.add_argument("--label", required=True, type=Path, help="label map PNG of class ids, or a directory of them")
    p.add_argument(
        "--instance",
        type=Path,
        help="instance-id PNG (or directory, paired by file stem); without it an instance-aware "
        "model uses the label map's class boundaries as edges",
    )
    p.add_argument("--style", type=Path, help="style image for models with an encoder (its mean code is used as z)")
    p.add_argument("--seed", type=int, default=0, help="style seed for models with an encoder (default 0)")
    p.add_argument(
        "--output",
        type=Path,
        help="output PNG (single label) or directory (label directory); default LABELSTEM_synthesized.png "
        "or ./synthesized/",
    )
    p.add_argument("--resize-to-label", action="store_true", help="resize the result back to the label map's size")
    p.add_argument("--preset", help="fail unless the checkpoint was made for this preset")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass in directory mode")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    return parser


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpadeError(f"--device {name} asked for, but no CUDA device is available")
    return name


def cmd_presets(args: argparse.Namespace) -> None:
    from spade.presets import PRESETS

    print(f"{'preset':<11} {'classes':>7} {'dontcare':>8} {'instance':>8} {'size (WxH)':>10}  upsampling  notes")
    for p in PRESETS.values():
        h, w = p.output_size
        print(
            f"{p.name:<11} {p.label_nc:>7} {'yes' if p.contain_dontcare_label else 'no':>8} "
            f"{'yes' if p.use_instance else 'no':>8} {f'{w}x{h}':>10}  {p.num_upsampling_layers:<10}  {p.description}"
        )


def train_settings(args: argparse.Namespace):  # noqa: ANN201
    from spade.config import load_settings

    params = args.params
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    overrides = list(args.overrides)
    shortcuts = {
        "iterations": "train.iterations",
        "batch_size": "train.batch_size",
        "out": "train.out_dir",
        "data": "data.root",
        "precision": "train.precision",
        "device": "train.device",
        "vgg_weights": "train.vgg_weights",
    }
    for attr, key in shortcuts.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_vgg_loss:
        overrides.append("train.vgg_loss=false")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    return load_settings(params, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from spade.train.loop import SIGTERM_EXIT, train

    settings = train_settings(args)
    result = train(settings, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return SIGTERM_EXIT if result.stopped_by_signal else 0
    if result.stopped_by_signal:
        print(f"stopped at iteration {result.iteration}; checkpoint {result.checkpoint}; continue with --resume")
        return SIGTERM_EXIT
    print(f"finished {result.iteration} iterations; model: {result.final_model}; checkpoint: {result.checkpoint}")
    if result.run_id:
        print(f"MLflow run {result.run_id}")
    return 0


def cmd_demo(args: argparse.Namespace) -> None:
    from spade.demo import run_demo

    params = args.params or (Path("params.yaml") if Path("params.yaml").is_file() else None)
    run_demo(params, args.overrides)


def cmd_data(args: argparse.Namespace) -> None:
    from spade.data.synthetic import generate_builtin_dataset

    root = generate_builtin_dataset(
        args.out, count=args.count, val_count=args.val_count, size=args.size, seed=args.seed, overwrite=args.overwrite
    )
    print(f"built-in dataset ready in {root}")


def cmd_convert_official(args: argparse.Namespace) -> None:
    from spade.checkpoints import convert_official

    ckpt = convert_official(args.preset, args.generator, encoder=args.encoder, discriminator=args.discriminator)
    ckpt.save(args.output)
    parts = ["generator"] + [n for n in ("encoder", "discriminator") if getattr(ckpt, n) is not None]
    print(f"wrote {args.output} ({args.preset} preset; {', '.join(parts)})")


def cmd_synthesize(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from spade.synthesize import (
        Synthesizer,
        batched,
        pair_by_stem,
        prepare_label,
        read_rgb,
        save_png,
        to_uint8,
    )

    if args.batch_size < 1:
        raise SpadeError(f"--batch-size must be >= 1, got {args.batch_size}")
    synth = Synthesizer.from_file(args.checkpoint, device=_device(args.device), precision=args.precision)
    cfg = synth.config
    if args.preset and args.preset != cfg.preset:
        raise SpadeError(f"{args.checkpoint} is a {cfg.preset} checkpoint, not {args.preset}")
    style = None
    if args.style is not None:
        if synth.encoder is None:
            raise SpadeError(f"{args.checkpoint} has no image encoder, so --style cannot be used")
        style = read_rgb(args.style, cfg.output_size, what="style image").unsqueeze(0)
    elif not synth.multimodal and args.seed != 0:
        print("note: this model has no image encoder; --seed does not change its output", file=sys.stderr)

    def resize_target(item):  # noqa: ANN001, ANN202
        return item.original_size if args.resize_to_label else None

    if args.label.is_dir():
        if args.instance is not None and not args.instance.is_dir():
            raise SpadeError(f"--label is a directory, so --instance must be one too: {args.instance}")
        out_dir = args.output or Path("synthesized")
        if out_dir.exists() and not out_dir.is_dir():
            raise SpadeError(f"--label is a directory, so --output must be a directory: {out_dir}")
        pairs = pair_by_stem(args.label, args.instance)
        with tqdm(total=len(pairs), unit="img", desc="synthesize") as bar:
            for chunk in batched(pairs, args.batch_size):
                inputs = [prepare_label(cfg, lab, inst) for lab, inst in chunk]
                images = to_uint8(synth.synthesize_inputs(inputs, style=style, seed=args.seed))
                for item, image in zip(inputs, images, strict=True):
                    save_png(image, out_dir / f"{item.name}.png", resize_to=resize_target(item))
                bar.update(len(chunk))
        print(f"wrote {len(pairs)} image(s) to {out_dir}/")
        return

    if args.instance is not None and args.instance.is_dir():
        raise SpadeError(f"--label is a file, so --instance must be a file too: {args.instance}")
    item = prepare_label(cfg, args.label, args.instance)
    out = args.output or Path(f"{item.name}_synthesized.png")
    if out.is_dir():
        out = out / f"{item.name}.png"
    image = to_uint8(synth.synthesize_inputs([item], style=style, seed=args.seed))[0]
    save_png(image, out, resize_to=resize_target(item))
    h, w = image.shape[:2] if not args.resize_to_label else item.original_size
    print(f"wrote {out} ({w}x{h})")


COMMANDS = {
    "presets": cmd_presets,
    "train": cmd_train,
    "data": cmd_data,
    "demo": cmd_demo,
    "convert-official": cmd_convert_official,
    "synthesize": cmd_synthesize,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except SpadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
