"""`spade ...` subcommands: each parses its arguments and calls into the library."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from spade.config import PRECISION_CHOICES, add_precision_argument, add_settings_arguments, load_settings, params_path
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
    "evaluate": """examples:
  spade evaluate --checkpoint runs/demo/final.pt --data data/builtin --segmenter small \\
      --segmenter-weights runs/segmenter/small_segmenter.pt --no-fid
  spade evaluate --checkpoint coco.pt --layout coco --data datasets/coco_stuff --segmenter deeplabv2-cocostuff \\
      --segmenter-weights deeplabv2_resnet101_msc-cocostuff164k-100000.pth \\
      --inception-weights pt_inception-2015-12-05-6726825d.pth --num-samples 500
""",
    "fid": """examples:
  spade fid real_images/ synthesized/ --inception-weights pt_inception-2015-12-05-6726825d.pth
  spade fid real_stats.npz synthesized/            # statistics saved earlier, or by pytorch-fid --save-stats
""",
    "pseudolabel": """examples:
  spade pseudolabel --images photos/ --segmenter deeplabv2-cocostuff \\
      --weights deeplabv2_resnet101_msc-cocostuff164k-100000.pth --out data/landscapes --min-confidence 0.5
  spade pseudolabel --images photos/ --segmenter small --weights runs/segmenter/small_segmenter.pt --out data/pl
""",
    "segmenter train": """examples:
  spade segmenter train --data data/builtin --out runs/segmenter/small_segmenter.pt
  spade segmenter train --data data/builtin --out runs/segmenter --iterations 600 --size 64
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

    def add(name: str, help_text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog or EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    add("presets", "List the named presets (label classes, resolution, preprocessing).")

    p = add("train", "Train a SPADE model with the settings of params.yaml (overridable here).")
    add_settings_arguments(p)
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
    p.add_argument("--precision", choices=PRECISION_CHOICES, help="same as --set train.precision=")
    p.add_argument("--device", help="cpu, cuda or auto (same as --set train.device=)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable or unpaired files instead of failing")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    p = add("demo", "Built-in landscapes -> train a small model -> synthesize a validation grid (all local).")
    add_settings_arguments(p)

    p = add("evaluate", "Score a checkpoint: mIoU and pixel accuracy by a segmenter, FID; writes metrics.json.")
    p.add_argument("--checkpoint", required=True, type=Path, help="project checkpoint (.pt)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--layout", default="custom", help="coco, ade20k, cityscapes or custom (default)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--segmenter", required=True, help="deeplabv2-cocostuff, torchvision-deeplabv3 or small")
    p.add_argument("--segmenter-weights", required=True, help="segmenter weights: path or s3:// URI")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    p.add_argument("--no-fid", action="store_true", help="skip FID (when the Inception weights are not at hand)")
    p.add_argument("--num-samples", type=int, default=0, help="evaluate the first N samples (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder (default ./evaluation)")
    p.add_argument("--device", default="auto")
    add_precision_argument(p)
    p.add_argument("--seed", type=int, default=0, help="style seed for multi-modal models")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--experiment", default="spade", help="MLflow experiment when the checkpoint has no run")

    p = add("fid", "Frechet Inception Distance between two image folders (like the pytorch-fid command).")
    p.add_argument("dir_a", help="folder of images, s3:// folder, or .npz statistics")
    p.add_argument("dir_b", help="folder of images, s3:// folder, or .npz statistics")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached statistics")

    p = add("pseudolabel", "Label a photo collection with a segmenter into a trainable custom-layout dataset.")
    p.add_argument("--images", required=True, type=Path, help="folder of photos")
    p.add_argument("--segmenter", required=True, help="deeplabv2-cocostuff, torchvision-deeplabv3 or small")
    p.add_argument("--weights", required=True, help="segmenter weights: path or s3:// URI")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (resumable)")
    p.add_argument("--min-confidence", type=float, default=0.0, help="drop photos whose mean confidence is lower")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--copy-images", action="store_true", help="copy photos instead of linking them")
    p.add_argument("--recursive", action="store_true", help="also photos in sub-folders")
    p.add_argument("--device", default="auto")

    seg = sub.add_parser("segmenter", help="Segmenter tools (the small segmenter for the built-in data).")
    seg_sub = seg.add_subparsers(dest="segmenter_command", required=True, metavar="SEGMENTER_COMMAND")
    p = seg_sub.add_parser(
        "train",
        help="Fit the small segmenter on a custom-layout dataset (the built-in landscapes).",
        description="Fit the small segmenter on a custom-layout dataset with classes.txt (the built-in landscapes).",
        epilog=EXAMPLES["segmenter train"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="dataset root (custom layout with classes.txt)")
    p.add_argument("--out", required=True, type=Path, help="weights file to write, or a folder")
    p.add_argument("--size", type=int, default=64, help="training resolution (default 64)")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)

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
    add_precision_argument(p)

    from pipelines import cli as pipeline_cli
    from spade.data import fetch
    from spade.serve import deploy, package, register, studio

    p = add(
        "pipeline", "Compile, run locally, submit or schedule the Kubeflow training pipeline.", pipeline_cli.EXAMPLES
    )
    pipeline_cli.add_arguments(p)

    p = add(
        "fetch",
        "Fetch a dataset (folder, archive, http(s), s3:// or flickr:) and recognise its layout.",
        fetch.EXAMPLES,
    )
    fetch.add_arguments(p)

    p = add("package", "Build a TorchServe model archive (.mar) and the KServe storage layout.", package.EXAMPLES)
    package.add_arguments(p)

    p = add(
        "register",
        "Register a model archive in MLflow; promote it to champion if it passes the gate.",
        register.EXAMPLES,
    )
    register.add_arguments(p)

    p = add(
        "deploy",
        "Make a model version live behind a running TorchServe: register, wait ready, switch, then retire the old.",
        deploy.EXAMPLES,
    )
    deploy.add_arguments(p)

    p = add("studio", "The GauGAN painter: paint a label map in the browser, see the photo appear.", studio.EXAMPLES)
    studio.add_arguments(p)

    return parser


def _device(name: str) -> str:
    from spade.devices import resolve_device

    return str(resolve_device(name))


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

    params = params_path(args.params)
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


def cmd_evaluate(args: argparse.Namespace) -> None:
    from spade.config import DataConfig, TrackingConfig
    from spade.evaluate.evaluation import evaluate

    if args.batch_size < 1 or args.num_samples < 0:
        raise SpadeError("--batch-size must be >= 1 and --num-samples >= 0")
    result = evaluate(
        args.checkpoint,
        DataConfig(layout=args.layout, root=args.data, split=args.split),
        segmenter=args.segmenter,
        segmenter_weights=args.segmenter_weights,
        inception_weights=args.inception_weights,
        fid=not args.no_fid,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        device=_device(args.device),
        precision=args.precision,
        out_dir=args.out,
        seed=args.seed,
        tracking=TrackingConfig(enabled=not args.no_tracking, experiment=args.experiment),
    )
    m = result.metrics
    fid = f", FID {m['fid']:.2f}" if "fid" in m else ""
    miou = "n/a" if m["mIoU"] is None else f"{100 * m['mIoU']:.1f}"
    acc = "n/a" if m["accuracy"] is None else f"{100 * m['accuracy']:.1f}"
    print(f"mIoU {miou}, accuracy {acc}{fid} over {m['counts']['images']} images")
    print(f"wrote {result.metrics_path} and {result.grid_path}")
    if result.mlflow_run_id:
        print(f"logged to MLflow run {result.mlflow_run_id}")


def cmd_fid(args: argparse.Namespace) -> None:
    from spade.evaluate.fid import fid_from_folders

    value = fid_from_folders(
        args.dir_a,
        args.dir_b,
        weights=args.inception_weights,
        batch_size=args.batch_size,
        device=_device(args.device),
        use_cache=not args.no_cache,
    )
    print(f"FID: {value:.4f}")


def cmd_pseudolabel(args: argparse.Namespace) -> None:
    from spade.evaluate.segmenters import load_segmenter
    from spade.pseudolabel import pseudolabel

    segmenter = load_segmenter(args.segmenter, args.weights, device=_device(args.device))
    report = pseudolabel(
        args.images,
        args.out,
        segmenter,
        batch_size=args.batch_size,
        min_confidence=args.min_confidence,
        split=args.split,
        link_images=not args.copy_images,
        recursive=args.recursive,
    )
    print(report.summary())


def cmd_segmenter(args: argparse.Namespace) -> None:
    from spade.evaluate.segmenters.small import train_small_segmenter

    path = train_small_segmenter(
        args.data, args.out, size=args.size, iterations=args.iterations, batch_size=args.batch_size, seed=args.seed
    )
    print(f"wrote {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    from spade.demo import run_demo

    run_demo(params_path(args.params), args.overrides)


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
    from spade.progress import progress_bar
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
        with progress_bar(total=len(pairs), unit="img", desc="synthesize") as bar:
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


def _main_of(module: str):  # noqa: ANN202
    """The `main(args)` of `module`, imported when the command runs, not when the CLI starts."""
    return lambda args: importlib.import_module(module).main(args)


COMMANDS = {
    "presets": cmd_presets,
    "train": cmd_train,
    "data": cmd_data,
    "demo": cmd_demo,
    "evaluate": cmd_evaluate,
    "fid": cmd_fid,
    "pseudolabel": cmd_pseudolabel,
    "segmenter": cmd_segmenter,
    "convert-official": cmd_convert_official,
    "synthesize": cmd_synthesize,
    "pipeline": _main_of("pipelines.cli"),
    "fetch": _main_of("spade.data.fetch"),
    "package": _main_of("spade.serve.package"),
    "register": _main_of("spade.serve.register"),
    "deploy": _main_of("spade.serve.deploy"),
    "studio": _main_of("spade.serve.studio"),
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
