#!/usr/bin/env python
"""Paired comparison of two evaluations of the same images: mean per-image difference and Wilcoxon signed-rank test.

    python benchmarks/compare_runs.py outputs/ablation_3ep/lora_only/eval_per_image.jsonl out/final_test.csv \
        [--model_a imedsam] [--model_b baseline_sam] [--metric dice] [--json out.json]

Each side is a per-image file: the `eval_per_image.jsonl` that training/train.py writes next to a run, or the CSV of
training/evaluate.py. Rows are matched by (output size, image stem), per structure for class-prompted rows (the rows of an
image's jitter draws, `--jitter-draws K`, averaged first); `--model_a/--model_b` pick the rows of one model
where a file holds several (train.py marks the zero-shot rows `baseline_sam`, evaluate.py the I-MedSAM rows
`imedsam`). On a test split of a few dozen images, differences of a tenth of a Dice point are usually noise: this
says which ones are not.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from common import report, write_json
from scipy.stats import wilcoxon

from imedsam_hf.metrics import METRIC_NAMES

# The model name of rows that carry none (train.py's own model rows).
DEFAULT_MODEL = "imedsam"


def load_per_image(path: str | Path, model: str | None, metric: str) -> dict[tuple[str, str], float]:
    """`{(size, stem): value}` of one model's rows in a per-image JSONL or CSV file; the rows of an image's jitter
    draws (`imedsam evaluate --jitter-draws K`: a `jitter_draw` column) averaged into its value."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(
            f"error: {path}: no such per-image file (eval_per_image.jsonl of a run, or evaluate.py's CSV)."
        )
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    wanted = model or DEFAULT_MODEL
    grouped: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row.get("model", DEFAULT_MODEL) != wanted or row.get(metric) in (None, ""):
            continue
        # Class-prompted rows (one per structure of an image) are matched per structure: (size, "stem#class").
        stem = f"{row['stem']}#{row['class']}" if row.get("class") not in (None, "") else row["stem"]
        key = (str(row["size"]), stem)
        if key in grouped and row.get("jitter_draw") in (None, ""):
            raise SystemExit(f"error: {path}: several {metric!r} rows of model {wanted!r} for {stem} at size {key[0]}.")
        grouped.setdefault(key, []).append(float(row[metric]))
    values = {key: float(np.mean(scores)) for key, scores in grouped.items()}
    if not values:
        models = sorted({row.get("model", DEFAULT_MODEL) for row in rows})
        raise SystemExit(f"error: {path}: no {metric!r} rows of model {wanted!r}; models in the file: {models}.")
    return values


def compare(a: dict, b: dict) -> list[dict]:
    """Per output size: images, mean of a - b, how often a is higher, and the Wilcoxon signed-rank p-value."""
    rows = []
    for size in sorted({key[0] for key in a} & {key[0] for key in b}):
        keys = sorted(key for key in a if key[0] == size and key in b)
        first, second = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
        difference = first - second
        p_value = float(wilcoxon(first, second).pvalue) if np.any(difference != 0) else 1.0
        rows.append(
            {
                "output": size,
                "n": len(keys),
                "mean_a": float(first.mean()),
                "mean_b": float(second.mean()),
                "mean_difference": float(difference.mean()),
                "a_higher": int((difference > 0).sum()),
                "wilcoxon_p": p_value,
            }
        )
    if not rows:
        raise SystemExit(
            "error: the two files share no (output size, image) pairs: were they scored on the same split?"
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--model_a", default=None)
    parser.add_argument("--model_b", default=None)
    parser.add_argument("--metric", default="dice", choices=list(METRIC_NAMES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = compare(load_per_image(args.a, args.model_a, args.metric), load_per_image(args.b, args.model_b, args.metric))
    result = {"benchmark": "compare_runs", "a": args.a, "b": args.b, "metric": args.metric, "rows": rows}
    header = f"a = {args.a} ({args.model_a or DEFAULT_MODEL}), b = {args.b} ({args.model_b or DEFAULT_MODEL})"
    shown = {**result, "rows": [{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
    report(shown, header, ["output", "n", "mean_a", "mean_b", "mean_difference", "a_higher", "wilcoxon_p"], None)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
