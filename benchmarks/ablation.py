#!/usr/bin/env python
"""The paper's ablation on our data (LoRA only / +FA / +INR / all), the refine ratio of uncertainty-guided sampling,
and the released code's undocumented differences (issue 11), each trained with the same recipe and scored on the
same test split, with exact boxes and, with `--jitter`, with imperfect (jittered) boxes.

    python benchmarks/ablation.py --config training/configs/litemedsam_polyp.yaml \
        --data_dir ../shared/data/EndoTect2020-polyp --output_dir outputs/ablation \
        --json benchmarks/results/ablation_litemedsam.json [--variants lora_only lora_fa lora_inr all]
        [--refine_ratios 0 0.03125 0.0625 0.125 0.25 0.5] [--set epochs=3 ...]
        [--jitter 0.1] [--reference all] [--zero_shot]

Each run is `training/train.py` with the base config plus the variant's switches (a few CPU minutes to tens of
minutes each on LiteMedSAM); a run whose folder already holds `eval_results.json` is read, not retrained, so an
interrupted sweep resumes. The table gathers Dice and HD95 of every run's `eval_results.json`; `--jitter F` also
scores each run's final model with every box side moved by up to F of the box size (`imedsam evaluate --box-jitter
F`, the same boxes for every run); `--reference NAME` adds paired per-image differences to that run (Wilcoxon
signed-rank, native size), and `--zero_shot` the backbone's own mask on the same boxes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from common import print_table, write_json
from compare_runs import compare, load_per_image

from imedsam_hf.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
ALL = ["--use_lora", "true", "--use_frequency_adapter", "true", "--use_implicit_decoder", "true"]
VARIANTS = {
    "lora_only": ["--use_lora", "true", "--use_frequency_adapter", "false", "--use_implicit_decoder", "false"],
    "lora_fa": ["--use_lora", "true", "--use_frequency_adapter", "true", "--use_implicit_decoder", "false"],
    "lora_inr": ["--use_lora", "true", "--use_frequency_adapter", "false", "--use_implicit_decoder", "true"],
    "all": ALL,
    # The released code's four differences (README, "Design notes"), each alone on top of "all".
    "chain_normalized": ALL + ["--peft_overrides", '{"chain": "normalized"}'],
    "lora_gate": ALL + ["--peft_overrides", '{"lora_gate": true}'],
    "anneal": ALL + ["--coordinate_annealing_epochs", "2"],
    "loss_released": ALL + ["--loss_composition", "released"],
    # The box-robustness baseline: a MedSAM-style fine-tune of the prompt embeddings and the whole mask decoder on
    # the frozen image encoder, SAM's own mask output, no adapter layer.
    "medsam_ft": ["--use_lora", "false", "--use_frequency_adapter", "false", "--use_implicit_decoder", "false"]
    + ["--peft_overrides", '{"train_mask_decoder": true}'],
    # I-MedSAM with the whole mask decoder trained too (the two-way transformer reads the box).
    "all_mask_decoder": ALL + ["--peft_overrides", '{"train_mask_decoder": true}'],
    # I-MedSAM with the two-way transformer (what reads the box) trained too, at a tenth of the adapters' rate; and
    # the same with boxes jittered by up to 20% in training (issue 14: box robustness without losing exact boxes).
    "transformer_low_lr": ALL
    + ["--peft_overrides", '{"train_mask_decoder": "transformer"}', "--mask_decoder_learning_rate", "1e-5"],
    "transformer_low_lr_jitter_0.2": ALL
    + ["--peft_overrides", '{"train_mask_decoder": "transformer"}', "--mask_decoder_learning_rate", "1e-5"]
    + ["--box_jitter", "0.2"],
    # Point prompts in training: half (a fifth) of the steps prompt with 1-3 random positive clicks instead of the box.
    "clicks": ALL + ["--max_clicks", "3", "--click_probability", "0.5"],
    "clicks_rare": ALL + ["--max_clicks", "3", "--click_probability", "0.2"],
}
ZERO_SHOT = "zero-shot"
EXACT_ROWS = "eval_per_image.jsonl"  # what train.py writes of its final, exact-box evaluation


def load_train_script():
    spec = importlib.util.spec_from_file_location("imedsam_train", REPO / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_folder(output_dir: str, name: str) -> Path:
    return Path(output_dir) / name.replace(", ", "_").replace(" ", "_")


def train_or_read(folder: Path, arguments: list[str]) -> dict:
    """Train one run, or read the results of a run that already finished in `folder`."""
    done = folder / "eval_results.json"
    if done.is_file():
        print(f"{folder}: finished earlier, reading {done.name}")
        return json.loads(done.read_text())
    return load_train_script().main(arguments)


def scored(
    folder: Path, data_dir: str, jitter: float, seed: int, zero_shot: bool = False, backbone: str | None = None
) -> Path:
    """
    Score `folder/final` on its test split with exact (`jitter` 0) or jittered boxes, and with `zero_shot` its
    backbone (`backbone`, default the one the model records) on the same boxes; once, keeping the summary JSON and
    the per-image CSV beside the run. Returns the CSV's path.
    """
    name = (f"jitter_{jitter:g}" if jitter else "exact") + ("_zero_shot" if zero_shot else "")
    summary = folder / f"{name}.json"
    if not summary.is_file():
        argv = ["evaluate", "--model", str(folder / "final"), "--data-dir", data_dir, "--json", str(summary)]
        argv += ["--split", "test", "--split-file", str(folder / "splits.json")]
        argv += ["--box-jitter", str(jitter), "--jitter-seed", str(seed)]
        argv += ["--baseline"] if zero_shot else []
        argv += ["--baseline-model", backbone] if zero_shot and backbone else []
        if cli_main(argv) != 0:
            raise SystemExit(f"error: evaluating {folder / 'final'} failed (see above).")
    return summary.with_suffix(".csv")


def per_image(folder: Path, data_dir: str, jitter: float, seed: int) -> Path:
    """A run's per-image rows: its own final evaluation with exact boxes, or `scored` with jittered ones."""
    return scored(folder, data_dir, jitter, seed) if jitter else folder / EXACT_ROWS


def paired(a_file: Path, b_file: Path, a_model: str | None = None) -> dict:
    """Native-size paired comparison of a (rows of `a_model`) against b: mean difference (Dice points), p-value."""
    rows = compare(load_per_image(a_file, a_model, "dice"), load_per_image(b_file, None, "dice"))
    native = next(row for row in rows if row["output"] == "native")
    return {"difference_points": 100 * native["mean_difference"], "p": native["wilcoxon_p"], "n": native["n"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--variants", nargs="*", default=["lora_only", "lora_fa", "lora_inr", "all"], choices=list(VARIANTS)
    )
    parser.add_argument("--refine_ratios", nargs="*", type=float, default=[0, 0.03125, 0.0625, 0.125, 0.25, 0.5])
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="extra train.py options as key=value (e.g. epochs=3, output_sizes=[native,128])",
    )
    parser.add_argument("--jitter", type=float, default=None, help="also score every run with boxes jittered by F")
    parser.add_argument("--jitter_seed", type=int, default=0)
    parser.add_argument("--reference", default=None, help="a run of this sweep to pair every other run with")
    parser.add_argument("--zero_shot", action="store_true", help="with --reference: also the backbone's own mask")
    parser.add_argument("--baseline_model", default=None, help="--zero_shot's backbone (default: the runs' base_model)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = args.variants + [f"all, refine {ratio:g}" for ratio in args.refine_ratios]
    if args.reference is not None and args.reference not in names:
        raise SystemExit(f"error: --reference {args.reference}: not one of this sweep's runs {names}.")
    if args.zero_shot and args.reference is None:
        raise SystemExit("error: --zero_shot needs --reference (the run whose test split and boxes it reuses).")
    extra = [part for item in args.set for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    switches = {**VARIANTS, **{f"all, refine {r:g}": ALL + ["--refine_ratio", str(r)] for r in args.refine_ratios}}
    rows, folders = [], {}
    for name in names:
        folder = folders[name] = run_folder(args.output_dir, name)
        base = [
            "--config",
            args.config,
            "--data_dir",
            args.data_dir,
            "--output_dir",
            str(folder),
            "--baseline",
            "false",
        ]
        results = train_or_read(folder, base + switches[name] + extra)
        for size, values in (results.get("results") or {}).items():
            rows.append(
                {"run": name, "boxes": "exact", "output": size, **{k: values[k] for k in ("dice", "hd95", "n")}}
            )
        if args.jitter:
            summary = json.loads(
                scored(folder, args.data_dir, args.jitter, args.jitter_seed).with_suffix(".json").read_text()
            )
            values = summary["results"]["native"]
            rows.append(
                {
                    "run": name,
                    "boxes": f"jitter {args.jitter:g}",
                    "output": "native",
                    **{k: values[k] for k in ("dice", "hd95", "n")},
                }
            )
    comparisons = []
    if args.reference is not None:
        reference = folders[args.reference]
        others = [name for name in names if name != args.reference]
        for jitter in [0.0] + ([args.jitter] if args.jitter else []):
            boxes = f"jitter {jitter:g}" if jitter else "exact"
            reference_rows = per_image(reference, args.data_dir, jitter, args.jitter_seed)
            targets = [
                (name, per_image(folders[name], args.data_dir, jitter, args.jitter_seed), None) for name in others
            ]
            if args.zero_shot:
                zero_shot = scored(reference, args.data_dir, jitter, args.jitter_seed, True, args.baseline_model)
                targets.append((ZERO_SHOT, zero_shot, "baseline_sam"))
            comparisons += [
                {"run": name, "boxes": boxes, **paired(rows_file, reference_rows, model)}
                for name, rows_file, model in targets
            ]
    result = {
        "benchmark": "ablation",
        "config": args.config,
        "data_dir": args.data_dir,
        "set": args.set,
        "rows": rows,
        **({"reference": args.reference, "paired_vs_reference": comparisons} if comparisons else {}),
    }
    print_table(rows, ["run", "boxes", "output", "dice", "hd95", "n"])
    if comparisons:
        print(f"\npaired against {args.reference} (native size; difference in Dice points, run minus reference):")
        print_table(comparisons, ["run", "boxes", "difference_points", "p", "n"])
    if args.json:
        write_json(args.json, result)
    (Path(args.output_dir) / "ablation.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
