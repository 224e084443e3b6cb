#!/usr/bin/env python
"""Fine-tune I-MedSAM on a folder of images and masks (or a Hub dataset) with Accelerate.

    accelerate launch training/train.py --config training/configs/litemedsam_polyp.yaml \
        [--data_dir DIR] [--output_dir DIR] [--epochs 3] [--model.refine_ratio 0.25] ...

Any config key can be overridden as `--section.key value` or, when the key name is unique, `--key value`
(values are parsed as YAML: `--augment false`, `--output_sizes "[native, 128]"`). One process on CPU without an
Accelerate config; `accelerate launch --multi_gpu --num_processes N` for DDP (see training/accelerate_configs/).

The run writes into `output_dir`: `config.yaml` (the resolved config), `splits.json`, `data_problems.txt` (files
skipped, with the reason), `logs/train_log.jsonl` (+ TensorBoard when installed), `checkpoints/checkpoint-<step>/`
(trainable weights, optimizer, scheduler, RNG and data position; `--resume_from_checkpoint latest` continues a
killed run exactly), `best/` (trainable weights of the best validation Dice), `final/` (the publishing form:
AutoModel-loadable full model, processor, adapter in `final/adapter/`, model card README.md) and
`eval_results.json`. `--push_to_hub --hub_model_id ORG/NAME` uploads checkpoints in the background and the final
model with its card at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from huggingface_hub import HfApi
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import imedsam_hf  # noqa: F401  (registers the model and the PEFT type)
from imedsam_hf import imedsam_peft_config, processor_for_config, save_pretrained_full
from imedsam_hf.data import (
    DataConfig,
    SegmentationDataset,
    SegmentationPair,
    collate,
    discover_pairs,
    load_hub_dataset,
    load_splits,
    make_splits,
    records_from_pairs,
    validate_pairs,
    write_splits,
)
from imedsam_hf.evaluation import NATIVE, evaluate_pairs
from imedsam_hf.metrics import dice
from imedsam_hf.model_card import write_model_card
from imedsam_hf.processing_imedsam import IMedSamProcessor
from imedsam_hf.training import fine_weight_at, load_backbone, parameter_groups, sample_points, segmentation_loss

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "backbone": "litemedsam",
        "image_size": None,
        "use_lora": True,
        "use_frequency_adapter": True,
        "use_implicit_decoder": True,
        "frequency_fusion_gate": False,
        "implicit_sam_prior": False,
        "refine_ratio": 0.125,
        "mc_passes": 2,
        "num_classes": 1,
        "base_model_license": None,
        "config_overrides": {},
        "peft_overrides": {},
    },
    "data": {
        "data_dir": None,
        "dataset": None,
        "dataset_split": "train",
        "image_column": "image",
        "mask_column": "mask",
        "split_file": None,
        "split_seed": 0,
        "split_fractions": [0.6, 0.2, 0.2],
        "on_error": "skip",
        "augment": True,
        "box_jitter": 0.1,
        "prompt": "box",
        "class_prompts": False,
        "mask_classes": None,
        "name": None,
        "license": None,
        "citation": None,
    },
    "training": {
        "output_dir": "outputs/imedsam",
        "epochs": 10,
        "max_train_steps": None,
        "batch_size": 1,
        "eval_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 5.0e-5,
        "implicit_learning_rate": 1.0e-3,
        "weight_decay": 0.01,
        "warmup_steps": 0,
        "fine_weight_warmup_epochs": 5,
        "train_points": None,
        "dice_weight": 0.8,
        "bce_weight": 0.2,
        "mixed_precision": "no",
        "seed": 0,
        "num_workers": 0,
        "num_threads": None,
        "eval_every_epochs": 1,
        "checkpointing_steps": "epoch",
        "checkpoints_total_limit": 2,
        "resume_from_checkpoint": None,
        "stop_after_steps": None,
        "report_to": "auto",
    },
    "evaluation": {
        "output_sizes": [NATIVE],
        "baseline": True,
        "split": "test",
    },
    "hub": {
        "push_to_hub": False,
        "hub_model_id": None,
        "hub_private": False,
        "hub_token": None,
    },
}


# ----------------------------------------------------------------------------------------------- configuration


def parse_args(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The config file merged over the defaults, then the command-line overrides."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with model/data/training/evaluation/hub sections")
    parser.add_argument("--push_to_hub", action="store_true", help="same as --hub.push_to_hub true")
    args, rest = parser.parse_known_args(argv)
    config = {section: dict(values) for section, values in DEFAULTS.items()}
    if args.config:
        path = Path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SystemExit(f"error: --config {path}: {error}") from error
        for section, values in loaded.items():
            if section not in config or not isinstance(values, dict):
                raise SystemExit(f"error: --config {path}: unknown section {section!r}; expected {list(config)}.")
            for key, value in values.items():
                set_key(config, f"{section}.{key}", value, source=str(path))
    apply_overrides(config, rest)
    if args.push_to_hub:
        config["hub"]["push_to_hub"] = True
    return config


def set_key(config: dict, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in config or key not in config[section]:
        raise SystemExit(f"error: {source}: unknown key {dotted!r}.")
    config[section][key] = value


def apply_overrides(config: dict, argv: list[str]) -> None:
    """`--section.key value` or `--key value` (unique key name); values parsed as YAML."""
    index = 0
    while index < len(argv):
        flag = argv[index]
        if not flag.startswith("--"):
            raise SystemExit(f"error: unexpected argument {flag!r}; overrides look like --key value.")
        name, has_value, inline = flag[2:].partition("=")
        if has_value:
            raw = inline
            index += 1
        else:
            if index + 1 >= len(argv):
                raise SystemExit(f"error: {flag} needs a value.")
            raw = argv[index + 1]
            index += 2
        if "." not in name:
            sections = [s for s, values in config.items() if name in values]
            if len(sections) != 1:
                raise SystemExit(f"error: unknown or ambiguous option --{name}; use --section.{name}.")
            name = f"{sections[0]}.{name}"
        set_key(config, name, yaml.safe_load(raw), source="command line")


# ----------------------------------------------------------------------------------------------------- data


def load_pairs(config: dict, output_dir: Path, accelerator: Accelerator) -> dict[str, list]:
    """The train/validation/test records, with problems reported and splits written next to the run."""
    data = config["data"]
    num_classes = data["mask_classes"] or config["model"]["num_classes"]
    if data["dataset"]:
        records = {
            split: load_hub_dataset(data["dataset"], name, data["image_column"], data["mask_column"])
            for split, name in (("train", data["dataset_split"]),)
        }
        stems = list(records["train"]["stem"])
        splits = (
            load_splits(data["split_file"])
            if data["split_file"]
            else make_splits(stems, data["split_seed"], data["split_fractions"])
        )
        index = {stem: i for i, stem in enumerate(stems)}
        result = {name: records["train"].select([index[s] for s in splits[name]]) for name in splits}
        problems = []
    else:
        if not data["data_dir"]:
            raise SystemExit("error: set --data_dir (a folder with images/ and masks/) or --dataset (a Hub id).")
        pairs, problems = discover_pairs(data["data_dir"])
        pairs, problems = validate_pairs(pairs, num_classes, data["on_error"], problems)
        if not pairs:
            raise SystemExit(f"error: --data_dir {data['data_dir']}: no usable image/mask pairs.")
        by_stem = {p.stem: p for p in pairs}
        if data["split_file"]:
            splits = load_splits(data["split_file"])
            unknown = [s for s in sum(splits.values(), []) if s not in by_stem]
            if unknown:
                raise SystemExit(f"error: --split_file {data['split_file']}: stems not in the data: {unknown[:5]}")
        else:
            splits = make_splits(list(by_stem), data["split_seed"], data["split_fractions"])
        result = {name: [by_stem[s] for s in stems] for name, stems in splits.items()}
    if accelerator.is_main_process:
        write_splits(
            splits, output_dir / "splits.json", seed=data["split_seed"], source=data["dataset"] or data["data_dir"]
        )
        if problems:
            (output_dir / "data_problems.txt").write_text("\n".join(str(p) for p in problems) + "\n")
            for problem in problems:
                accelerator.print(f"skipped {problem}")
    if not len(result["train"]):
        raise SystemExit("error: the train split is empty.")
    return result


def as_records(split):
    return records_from_pairs(split) if isinstance(split, list) else split


# ---------------------------------------------------------------------------------------------- checkpoints


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights (and the running statistics of trainable BatchNorm layers)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    modules = {n.rpartition(".")[0] for n in names}
    state = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if key in names or (
            owner in modules and key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        ):
            state[key] = value.detach().cpu().contiguous()
    return state


def register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """`save_state` writes only trainable weights (a few MB instead of the whole backbone)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                save_file(
                    trainable_state(accelerator.unwrap_model(model)),
                    os.path.join(output_dir, f"trainable_{i}.safetensors"),
                )
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            state = load_file(os.path.join(input_dir, f"trainable_{len(models)}.safetensors"))
            result = accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise RuntimeError(f"{input_dir}: checkpoint keys not in the model: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = sorted(
        (p for p in (output_dir / "checkpoints").glob("checkpoint-*") if (p / "training_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- logging


class RunLog:
    """JSONL log on the main process, mirrored to Accelerate's trackers (TensorBoard when installed)."""

    def __init__(self, accelerator: Accelerator, path: Path, use_trackers: bool) -> None:
        self.accelerator = accelerator
        self.path = path
        self.use_trackers = use_trackers

    def __call__(self, record: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        if self.use_trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def validation_dice(model, loader, accelerator: Accelerator) -> float:
    """Mean Dice over the validation split, on the input frame's unpadded area (exact boxes)."""
    model.eval()
    scores = []
    for batch in loader:
        outputs = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"])
        predicted = IMedSamProcessor.post_process_masks(outputs.logits)
        values = []
        for pred, labels, (h, w) in zip(predicted, batch["labels"], batch["reshaped_size"].tolist()):
            values.append(dice(pred[:h, :w] > 0, labels[:h, :w] > 0))
        scores.append(torch.tensor(values, device=accelerator.device))
    model.train()
    if not scores:
        return float("nan")
    return accelerator.gather_for_metrics(torch.cat(scores)).mean().item()


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, hub_api: HfApi | None = None) -> dict[str, Any]:
    config = parse_args(argv)
    train_cfg, model_cfg, hub_cfg = config["training"], config["model"], config["hub"]
    if train_cfg["num_threads"]:
        torch.set_num_threads(int(train_cfg["num_threads"]))
    output_dir = Path(train_cfg["output_dir"])
    if hub_cfg["push_to_hub"] and not hub_cfg["hub_model_id"]:
        raise SystemExit("error: --push_to_hub needs --hub_model_id ORG/NAME.")
    use_trackers = train_cfg["report_to"] == "tensorboard" or (
        train_cfg["report_to"] == "auto" and tensorboard_available()
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=train_cfg["gradient_accumulation_steps"],
        mixed_precision=train_cfg["mixed_precision"],
        log_with="tensorboard" if use_trackers else None,
        project_dir=str(output_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(train_cfg["seed"])
    if accelerator.is_main_process:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    accelerator.wait_for_everyone()
    if use_trackers:
        accelerator.init_trackers(
            "imedsam", config={f"{s}.{k}": str(v) for s, d in config.items() for k, v in d.items()}
        )
    log = RunLog(accelerator, output_dir / "logs" / "train_log.jsonl", use_trackers)

    # Model and adapters.
    switches = ("use_lora", "use_frequency_adapter", "use_implicit_decoder", "frequency_fusion_gate")
    switches += ("implicit_sam_prior", "refine_ratio", "mc_passes", "num_classes")
    overrides = {**{k: model_cfg[k] for k in switches}, **(model_cfg["config_overrides"] or {})}
    try:
        base = load_backbone(model_cfg["backbone"], model_cfg["image_size"], **overrides)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --backbone {model_cfg['backbone']}: {error}") from error
    base.config.base_model = model_cfg["backbone"]
    processor = processor_for_config(base.config)
    model = get_peft_model(base, imedsam_peft_config(base.config, **(model_cfg["peft_overrides"] or {})))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,}")

    # Data.
    try:
        splits = load_pairs(config, output_dir, accelerator)
    except ValueError as error:  # bad data: one clear message naming the files, nothing half-written
        raise SystemExit(f"error: {error}") from error
    data_cfg = config["data"]
    data_config = DataConfig(
        num_classes=model_cfg["num_classes"],
        augment=DataConfig().augment if data_cfg["augment"] else None,
        box_jitter=data_cfg["box_jitter"],
        prompt=data_cfg["prompt"],
        class_prompts=data_cfg["class_prompts"],
        mask_classes=data_cfg["mask_classes"],
    )
    if data_cfg["class_prompts"] and model_cfg["num_classes"] != 1:
        raise SystemExit("error: --class_prompts makes one binary sample per class and box: use --num_classes 1.")
    train_set = SegmentationDataset(
        as_records(splits["train"]), processor, data_config, train=True, seed=train_cfg["seed"]
    )
    val_set = SegmentationDataset(as_records(splits["validation"]), processor, data_config, train=False)
    # Loaders draw their worker seeds from their own generators: starting an iterator (as a resume does at a
    # different moment than the original run) must not consume the global RNG that dropout uses.
    loader_kwargs = dict(collate_fn=collate, num_workers=train_cfg["num_workers"])
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=train_cfg["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(train_cfg["seed"]),
        **loader_kwargs,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=train_cfg["eval_batch_size"], generator=torch.Generator(), **loader_kwargs
    )

    optimizer = torch.optim.AdamW(
        parameter_groups(
            model, train_cfg["learning_rate"], train_cfg["implicit_learning_rate"], train_cfg["weight_decay"]
        )
    )
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / train_cfg["gradient_accumulation_steps"])
    max_steps = train_cfg["max_train_steps"] or train_cfg["epochs"] * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, train_cfg["warmup_steps"] * accelerator.num_processes, max_steps * accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    register_checkpoint_hooks(accelerator)

    state = {"epoch": 0, "batches_done": 0, "global_step": 0, "best_val_dice": -1.0, "best_step": None}
    resume = train_cfg["resume_from_checkpoint"]
    if resume:
        path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
        if path is None:
            accelerator.print(f"no checkpoint in {output_dir / 'checkpoints'}: starting from scratch")
        else:
            accelerator.load_state(str(path))
            state = json.loads((path / "training_state.json").read_text())
            accelerator.print(f"resumed from {path} (epoch {state['epoch']}, step {state['global_step']})")

    futures = []
    api = None
    if hub_cfg["push_to_hub"] and accelerator.is_main_process:
        api = hub_api or HfApi(token=hub_cfg["hub_token"])
        api.create_repo(hub_cfg["hub_model_id"], private=hub_cfg["hub_private"], exist_ok=True)

    def save_checkpoint() -> None:
        path = output_dir / "checkpoints" / f"checkpoint-{state['global_step']}"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            (path / "training_state.json").write_text(json.dumps(state))
            prune_checkpoints(output_dir, train_cfg["checkpoints_total_limit"])
            if api is not None:
                futures.append(
                    api.upload_folder(
                        repo_id=hub_cfg["hub_model_id"],
                        folder_path=str(path),
                        path_in_repo=f"checkpoints/{path.name}",
                        commit_message=f"checkpoint {path.name}",
                        run_as_future=True,
                    )
                )
        accelerator.wait_for_everyone()

    checkpoint_every = train_cfg["checkpointing_steps"]
    progress = tqdm(
        total=max_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process, desc="train"
    )
    model.train()
    while state["epoch"] < epochs and state["global_step"] < max_steps:
        epoch = state["epoch"]
        train_loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        loader = (
            accelerator.skip_first_batches(train_loader, state["batches_done"])
            if state["batches_done"]
            else train_loader
        )
        fine_weight = fine_weight_at(epoch, train_cfg["fine_weight_warmup_epochs"])
        for batch in loader:
            with accelerator.accumulate(model):
                labels, coordinates = batch["labels"], None
                if train_cfg["train_points"] and model_cfg["use_implicit_decoder"]:
                    coordinates, labels = sample_points(labels, batch["reshaped_size"], train_cfg["train_points"])
                outputs = model(
                    pixel_values=batch["pixel_values"],
                    input_boxes=batch["input_boxes"] if data_cfg["prompt"] == "box" else None,
                    query_coordinates=coordinates,
                )
                loss, parts = segmentation_loss(
                    outputs,
                    labels,
                    model_cfg["num_classes"],
                    fine_weight,
                    train_cfg["dice_weight"],
                    train_cfg["bce_weight"],
                )
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batches_done"] += 1
            if accelerator.sync_gradients:
                state["global_step"] += 1
                progress.update(1)
                progress.set_postfix(loss=f"{parts['loss']:.3f}")
                log(
                    {**parts, "epoch": epoch, "fine_weight": fine_weight, "lr": scheduler.get_last_lr()[0]},
                    state["global_step"],
                )
                if isinstance(checkpoint_every, int) and state["global_step"] % checkpoint_every == 0:
                    save_checkpoint()
                if state["global_step"] >= max_steps or state["global_step"] == train_cfg["stop_after_steps"]:
                    break
        end_of_epoch = state["global_step"] >= max_steps or state["batches_done"] >= len(train_loader)
        if end_of_epoch:
            state["epoch"] += 1
            state["batches_done"] = 0
            if state["epoch"] % train_cfg["eval_every_epochs"] == 0 or state["global_step"] >= max_steps:
                score = validation_dice(model, val_loader, accelerator) if len(val_set) else float("nan")
                log({"val_dice": score, "epoch": state["epoch"]}, state["global_step"])
                accelerator.print(f"epoch {state['epoch']}: validation Dice {score:.4f}")
                if not math.isnan(score) and score > state["best_val_dice"] or state["best_step"] is None:
                    state["best_val_dice"], state["best_step"] = score, state["global_step"]
                    if accelerator.is_main_process:
                        (output_dir / "best").mkdir(exist_ok=True)
                        save_file(
                            trainable_state(accelerator.unwrap_model(model)),
                            str(output_dir / "best" / "trainable.safetensors"),
                        )
                        (output_dir / "best" / "state.json").write_text(json.dumps(state))
            if checkpoint_every == "epoch":
                save_checkpoint()
        if state["global_step"] == train_cfg["stop_after_steps"]:
            accelerator.print(f"stopping after step {state['global_step']} (stop_after_steps), as if interrupted")
            progress.close()
            accelerator.end_training()
            return {"stopped_at_step": state["global_step"]}
    progress.close()
    accelerator.wait_for_everyone()

    # The best checkpoint (by validation Dice, never by test) becomes the final model.
    results: dict[str, Any] = {"best_val_dice": state["best_val_dice"], "best_step": state["best_step"]}
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        best = output_dir / "best" / "trainable.safetensors"
        if best.is_file():
            peft_model.load_state_dict(load_file(str(best)), strict=False)
        peft_model.eval()
        final_dir = output_dir / "final"
        save_pretrained_full(peft_model, final_dir, processor=processor)
        results.update(final_evaluation(config, peft_model, processor, splits, output_dir))
        write_model_card(
            final_dir,
            config=config,
            results=results,
            splits={k: len(v) for k, v in splits.items()},
            trainable_parameters=trainable,
            total_parameters=total,
        )
        shutil.copy(output_dir / "splits.json", final_dir / "splits.json")
        (final_dir / "eval_results.json").write_text(json.dumps(results, indent=1))
        if api is not None:
            for future in futures:
                future.result()
            api.upload_folder(
                repo_id=hub_cfg["hub_model_id"], folder_path=str(final_dir), commit_message="final model and model card"
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def final_evaluation(config: dict, model, processor, splits: dict, output_dir: Path) -> dict[str, Any]:
    """Test-split scores of the selected model and, with `evaluation.baseline`, of the zero-shot backbone."""
    evaluation = config["evaluation"]
    split = splits.get(evaluation["split"])
    if split is None or not len(split):
        return {}
    # Folder splits are SegmentationPairs already; Hub-dataset rows carry decoded images, which work the same way.
    pairs = split if isinstance(split, list) else [SegmentationPair(r["stem"], r["image"], r["mask"]) for r in split]
    kwargs = dict(
        output_sizes=evaluation["output_sizes"],
        prompt=config["data"]["prompt"],
        num_classes=config["model"]["num_classes"],
        class_prompts=config["data"]["class_prompts"],
        mask_classes=config["data"]["mask_classes"],
    )
    rows, summary = evaluate_pairs(model, processor, pairs, **kwargs, progress=True)
    results = {"n_images": len(pairs), "split": evaluation["split"], "results": summary}
    if evaluation["baseline"]:
        base_rows, base_summary = evaluate_pairs(model, processor, pairs, **kwargs, baseline=True, progress=True)
        results["baseline_sam"] = base_summary
        rows += [{**r, "model": "baseline_sam"} for r in base_rows]
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=1))
    with (output_dir / "eval_per_image.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(json.dumps({"test": summary, "baseline_sam": results.get("baseline_sam")}, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
