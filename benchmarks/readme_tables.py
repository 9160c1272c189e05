"""The README's speed tables, written from the committed results files: one table per kind of machine.

Every folder of benchmarks/results/ holds one kind of machine's results (benchmarks write there by
default: machine.kind_slug), and gets one table with its CPU (model, vector ISA, whether bf16 is
native, any ISA cap) above it. Rows, from what the folder holds:

- synthesis.json (benchmarks/synthesis.py): coco 256x256 batch 1, seconds per image of the four
  paths, each path's PSNR from float32 eager (COCO-Stuff sample label maps, random weights), and the
  time to load the checkpoint in a fresh process (a serving worker's start);
- fast_path_psnr.json (benchmarks/fast_path_psnr.py): the lowest PSNR from float32 eager over the
  demo model's validation maps;
- train_step.json (+ train_step_channels_last.json) (benchmarks/train_step.py): seconds per coco
  training iteration at batch 1;
- data_loading.json (benchmarks/data_loading.py): reading coco training samples.

    python benchmarks/readme_tables.py            # rewrite the README's tables between their markers
    python benchmarks/readme_tables.py --check    # exit 1 when the README differs from the results files
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- speed tables: written by benchmarks/readme_tables.py from benchmarks/results/; do not edit -->"
END = "<!-- end of speed tables -->"
PATHS = ("float32-eager", "bfloat16-eager", "float32-fast", "bfloat16-fast")


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _machine_line(machine: dict) -> str:
    kind = (
        machine.get("cpu_kind") or f"{machine['cpu']}, bf16 {'native' if machine.get('bf16_native') else 'not native'}"
    )
    gpu = (machine.get("cuda") or {}).get("device")
    where = f"{gpu} (host CPU: {kind})" if gpu else kind
    return f"{where}; {machine['cores']} cores, torch {machine['torch']}"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"


def _synthesis_rows(result: dict) -> list[list[str]]:
    coco = {r["path"]: r for r in result["results"] if r["config"] == "coco" and r["batch"] == 1}
    if not coco:
        return []
    speed = ["synthesis, s / image"] + [_seconds(coco[p]["median_s"]) if p in coco else "" for p in PATHS]
    psnr = ["PSNR from eager float32, dB (COCO-Stuff sample)"]
    for path in PATHS:
        versus = (coco.get(path) or {}).get("vs_float32_eager") or {}
        psnr.append("reference" if path == "float32-eager" else f"{versus['psnr_db']:.1f}" if versus else "")
    load = ["load a checkpoint in a fresh process, s"] + [
        _seconds(coco[p].get("load_s")) if p in coco else "" for p in PATHS
    ]
    return [speed, psnr, load]


def _psnr_row(result: dict) -> list[str]:
    by_path = {r["path"]: r for r in result["results"]}
    row = [f"lowest PSNR from eager float32, dB ({result['data']['what']})"]
    for path in PATHS:
        r = by_path.get(path)
        row.append("reference" if path == "float32-eager" else f"{r['min_psnr_db']:.1f}" if r else "")
    return row


def _training_row(*results: dict | None) -> list[str]:
    cases = [r for res in results if res for r in res["results"] if r["config"] == "coco" and r["batch"] == 1]
    if not cases:
        return []
    vgg = all(res["train_settings"].get("vgg_loss") for res in results if res)

    def pick(precision: str, channels_last: bool) -> float | None:
        found = [r["median_s"] for r in cases if r["precision"] == precision and r["channels_last"] == channels_last]
        return min(found) if found else None

    bf16 = _seconds(pick("bfloat16", False))
    bf16_cl = pick("bfloat16", True)
    if bf16_cl is not None:
        bf16 = f"{bf16} ({_seconds(bf16_cl)} channels-last)".strip()
    return [f"training iteration (D + G{', VGG on' if vgg else ''}), s", _seconds(pick("float32", False)), bf16, "", ""]


def _loading_line(result: dict) -> str:
    best = max(result["loader"], key=lambda r: r["samples_per_s"])
    config = result["config"]
    return (
        f"Reading coco training samples (resize {config['load_size']}, crop {config['output_size'][0]}, flip, "
        f"instance map): {result['step_ms']['total']:.1f} ms per sample in one process, "
        f"{best['samples_per_s']:.0f} samples/s with {best['workers']} workers at batch {best['batch']}."
    )


def table(folder: Path) -> str:
    """The Markdown of one kind of machine: its line, the table, the files it came from."""
    synthesis = _load(folder, "synthesis.json")
    psnr = _load(folder, "fast_path_psnr.json")
    train = _load(folder, "train_step.json")
    train_cl = _load(folder, "train_step_channels_last.json")
    loading = _load(folder, "data_loading.json")
    present = [r for r in (synthesis, psnr, train, train_cl, loading) if r]
    if not present:
        return ""
    rows = _synthesis_rows(synthesis) if synthesis else []
    if psnr:
        rows.append(_psnr_row(psnr))
    training = _training_row(train, train_cl)
    if training:
        rows.append(training)
    files = sorted(p.name for p in folder.glob("*.json"))
    lines = [f"**{_machine_line(present[0]['machine'])}**", ""]
    if rows:
        header = ["coco 256x256, batch 1", "eager float32", "eager bf16 autocast", "fast float32", "fast bf16"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    if loading:
        lines += [_loading_line(loading), ""]
    rel = folder.relative_to(ROOT)
    lines.append(f"From `{rel}/`: {', '.join(f'`{f}`' for f in files)}.")
    return "\n".join(lines)


def tables(results: Path = RESULTS) -> str:
    parts = [table(folder) for folder in sorted(p for p in results.iterdir() if p.is_dir())]
    return "\n\n".join(p for p in parts if p)


def rewrite(readme: str, body: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(
            f"{README.name}: the markers are missing; put these two lines where the tables go:\n{BEGIN}\n{END}"
        )
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when the README is out of date")
    args = parser.parse_args()
    current = README.read_text()
    wanted = rewrite(current, tables())
    if args.check:
        if wanted != current:
            print("README.md's speed tables differ from benchmarks/results/: run python benchmarks/readme_tables.py")
            return 1
        print("README.md's speed tables match benchmarks/results/")
        return 0
    if wanted != current:
        README.write_text(wanted)
        print("rewrote the speed tables in README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
