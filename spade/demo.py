"""`spade demo` (what `make demo` runs): built-in data -> training -> a validation grid, all local."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from spade.config import Settings, apply_overrides, load_params
from spade.errors import SpadeError


def run_demo(params: Path | None, overrides: list[str]) -> Path:
    from spade.data.layouts import find_pairs
    from spade.local_runs import builtin_dataset, without_missing_vgg
    from spade.synthesize import Synthesizer, prepare_label, read_rgb, save_png
    from spade.train.loop import train
    from spade.train.tracking import resolve_tracking_uri
    from spade.visualize import dataset_colours, sample_grid

    raw = apply_overrides(load_params(params), overrides)
    settings = Settings.from_dict(raw)
    start = time.perf_counter()

    print(f"[1/3] built-in landscapes -> {settings.data.root}")
    builtin_dataset(raw.get("builtin"), settings.data.root)
    settings = without_missing_vgg(settings, lambda text: print(f"      {text}"))

    print(f"[2/3] training {settings.train.iterations} iterations -> {settings.train.out_dir}")
    result = train(settings, resume="")
    if result.stopped_by_signal:
        raise SpadeError(f"stopped at iteration {result.iteration}; run `make demo` again to continue")

    out_dir = Path(settings.train.out_dir)
    print("[3/3] synthesizing the validation label maps")
    synth = Synthesizer.from_file(result.final_model, precision="float32")
    samples = find_pairs(replace(settings.data, split="val"))[:8]
    items = [prepare_label(synth.config, s.label, s.instance) for s in samples]
    fakes = synth.synthesize_inputs(items)
    reals = torch.stack([read_rgb(s.image, synth.config.output_size) for s in samples])
    labels = torch.stack([i.label for i in items])
    for item, fake in zip(items, fakes, strict=True):
        image = ((fake + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        save_png(image, out_dir / "val_synthesized" / f"{item.name}.png")
    colours = dataset_colours(settings.data.root, synth.config.label_nc)
    grid = sample_grid(labels, reals, fakes, synth.config.label_nc, colours=colours)
    grid = np.ascontiguousarray(grid.repeat(2, axis=0).repeat(2, axis=1))  # easier to see
    grid_path = save_png(grid, out_dir / "val_grid.png")
    l1 = (fakes - reals).abs().mean().item()

    uri = resolve_tracking_uri(settings.tracking)
    minutes = (time.perf_counter() - start) / 60
    print()
    print(f"done in {minutes:.1f} min")
    print(f"  validation grid (label | real | synthesized): {grid_path}")
    print(f"  synthesized images:                           {out_dir / 'val_synthesized'}/")
    print(f"  samples during training:                      {out_dir / 'samples'}/")
    print(f"  model checkpoint:                             {result.final_model}")
    print(f"  mean L1 to the real validation images:        {l1:.3f} (images in [-1, 1])")
    if result.run_id:
        print(f"  MLflow run {result.run_id}; browse the runs with:")
        if uri.startswith("sqlite:"):
            print(f"    .venv/bin/mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000")
        else:
            print(f"    open {uri}")
    print("  try your own label map:")
    print(
        f"    .venv/bin/spade synthesize --checkpoint {result.final_model} --label {samples[0].label} --output mine.png"
    )
    print("  paint one in the browser (GauGAN-style), then open the printed URL:")
    print(f"    .venv/bin/spade studio --checkpoint {result.final_model}")
    print("  serve it with TorchServe:")
    print(f"    .venv/bin/spade package --checkpoint {result.final_model} --name landscapes --version 1 --out dist/")
    sys.stdout.flush()
    return grid_path
