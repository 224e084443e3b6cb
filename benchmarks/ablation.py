#!/usr/bin/env python
"""The paper's ablation on our data: LoRA only / +FA / +INR / all, and the refine ratio of uncertainty-guided
sampling, each trained with the same recipe and scored on the same test split at native and cross resolutions.

    python benchmarks/ablation.py --config training/configs/litemedsam_polyp.yaml \
        --data_dir ../shared/data/EndoTect2020-polyp --output_dir outputs/ablation \
        --json benchmarks/results/ablation_litemedsam.json [--variants lora_only lora_fa lora_inr all]
        [--refine_ratios 0 0.03125 0.0625 0.125 0.25 0.5] [--set epochs=3 ...]

Each run is `training/train.py` with the base config plus the variant's switches (a few CPU minutes to tens of
minutes each on LiteMedSAM); the table gathers Dice and HD95 of every run's `eval_results.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from common import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora_only": ["--use_lora", "true", "--use_frequency_adapter", "false", "--use_implicit_decoder", "false"],
    "lora_fa": ["--use_lora", "true", "--use_frequency_adapter", "true", "--use_implicit_decoder", "false"],
    "lora_inr": ["--use_lora", "true", "--use_frequency_adapter", "false", "--use_implicit_decoder", "true"],
    "all": ["--use_lora", "true", "--use_frequency_adapter", "true", "--use_implicit_decoder", "true"],
}


def load_train_script():
    spec = importlib.util.spec_from_file_location("imedsam_train", REPO / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--refine_ratios", nargs="*", type=float, default=[0, 0.03125, 0.0625, 0.125, 0.25, 0.5])
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="extra train.py options as key=value (e.g. epochs=3, output_sizes=[native,128])",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    train = load_train_script()
    extra = [part for item in args.set for part in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
    runs = [(name, VARIANTS[name]) for name in args.variants]
    runs += [
        (f"all, refine {ratio:g}", VARIANTS["all"] + ["--refine_ratio", str(ratio)]) for ratio in args.refine_ratios
    ]
    rows = []
    for name, switches in runs:
        output = Path(args.output_dir) / name.replace(", ", "_").replace(" ", "_")
        base = [
            "--config",
            args.config,
            "--data_dir",
            args.data_dir,
            "--output_dir",
            str(output),
            "--baseline",
            "false",
        ]
        results = train.main(base + switches + extra)
        for size, values in (results.get("results") or {}).items():
            rows.append({"run": name, "output": size, "dice": values["dice"], "hd95": values["hd95"], "n": values["n"]})
    result = {"benchmark": "ablation", "config": args.config, "data_dir": args.data_dir, "rows": rows}
    print_table(rows, ["run", "output", "dice", "hd95", "n"])
    if args.json:
        write_json(args.json, result)
    (Path(args.output_dir) / "ablation.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
