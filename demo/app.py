"""Browser demo (Gradio, the Hugging Face Spaces convention): upload an image, type a box or click on it, get the mask.
A 2-D DICOM file (a radiograph, an ultrasound or endoscopy still) can be uploaded too: it is shown as a viewer shows it;
so can a 2-D image stored as MetaImage, NRRD or NIfTI (grand-challenge.org's `.mha`, CAMUS's `.nii.gz`).

    python demo/app.py                                         # LiteMedSAM zero-shot, offline
    python demo/app.py --model imedsam-litemedsam-polyp         # a shipped model, by name
    python demo/app.py --model outputs/litemedsam_polyp/final   # a trained I-MedSAM (folder or hub id)

A class-aware model (the shipped `imedsam-litemedsam-btcv`) asks which structure the box is for: its config records
its classes, and each box is decoded by that class's heads.

The "Volume" tab takes a CT or MR scan (NIfTI, NRRD, MetaImage, a multi-frame DICOM file or a DICOM series as a
`.zip`): browse its slices as the model sees them, draw each structure's box on one slice (two clicks on its corners,
or typed) and its first and last slice; "Segment volume" runs every box from its slice outwards (MedSAM's
propagation, `segment_volume` with key slices) and gives the label volume (in the scan's format, the structures named
in its header) and the boxes as `imedsam predict --boxes` takes them, to run the same prompts from the command line.
Then clicks on the slice correct the labels (a pixel added to a structure, or taken from it) by the rules of `imedsam
predict --corrections` (`refine_volume`), with an "Undo"; the clicks are written as `--corrections` takes them, so
`imedsam predict SCAN --boxes <scan>_boxes.json --corrections <scan>_clicks.json` gives the session's labels.

On Spaces, `app.py` is run as is; set IMEDSAM_DEMO_MODEL to choose the model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

import imedsam_hf.runtime as runtime  # looked up at call time: tests replace the allocator tuning
from imedsam_hf import load_model, overlay, segment
from imedsam_hf.commands.predict import refinement_text
from imedsam_hf.configuration_imedsam import is_class_aware, window_text
from imedsam_hf.data import label_volume_suffix
from imedsam_hf.evaluation import grid_size
from imedsam_hf.inference import clicks_caveat, windowed_slice
from imedsam_hf.loading import resolve_device
from imedsam_hf.processing_imedsam import (
    DICOM_EXTENSIONS,
    TTA_MIRRORS,
    VOLUME_SUFFIXES,
    is_grid_image,
    read_dicom_image,
    read_grid_image,
    to_rgb_array,
)
from imedsam_hf.volumes import (
    SliceEmbeddings,
    SliceView,
    Volume,
    dicom_series_in,
    is_mr_window,
    label_statistics,
    parse_window,
    read_volume,
    refine_volume,
    resolve_window,
    segment_volume,
    slice_image,
    structure_names_of,
    volume_name,
    write_label_volume,
)

RESOLUTIONS = ["native", "0.5x", "2x", "512 px", "1024 px"]
# Files the upload box takes besides pictures: 2-D DICOM, and 2-D MetaImage / NRRD / NIfTI (`.gz`: a browser's file
# picker matches `x.nii.gz` by its last extension).
UPLOAD_SUFFIXES = [*DICOM_EXTENSIONS, ".mha", ".nrrd", ".nii", ".nii.gz", ".gz"]


def output_grid(height: int, width: int, choice: str) -> tuple[int, int]:
    """The mask grid for a resolution choice ("512 px" is a longest side), as evaluation computes it."""
    return grid_size((height, width), choice.removesuffix(" px"))


def structure_choices(model) -> list[str]:
    """A class-aware model's structures as "<id> <name>" (what its config records), else none."""
    config = model.config
    if not is_class_aware(config):
        return []
    names = {int(k): v for k, v in (config.id2label or {}).items()}
    return [f"{i} {names.get(i, f'class {i}')}" for i in range(1, config.num_classes + 1)]


def file_upload(path: str | None, config=None) -> np.ndarray | None:
    """A 2-D DICOM file (a radiograph, an ultrasound or endoscopy still) or a 2-D MetaImage / NRRD / NIfTI image as
    the RGB picture the image pane shows, read as `imedsam predict` reads it: DICOM with the file's window
    (MONOCHROME1 inverted), a CT in HU with the window the model `config` records, other values min-max; what cannot
    be read, or a 3-D scan, says why."""
    if not path:
        return None
    try:
        if is_grid_image(path):
            picture = np.round(to_rgb_array(windowed_slice(read_grid_image(path), config))).astype(np.uint8)
        elif str(path).lower().endswith(VOLUME_SUFFIXES):
            raise ValueError(
                f"{os.path.basename(path)}: not a 2-D image (a 3-D scan, or unreadable); segment scans in the "
                "Volume tab or with imedsam predict (a label volume out)."
            )
        else:
            picture = read_dicom_image(path)
    except (ValueError, ImportError) as error:
        raise gr.Error(str(error)) from error
    return np.repeat(picture[..., None], 3, axis=-1) if picture.ndim == 2 else picture


def segment_request(model, processor, image, box_values, clicks, resolution, structure=None, tta="none"):
    """One press of "Segment": the typed box (all zeros: none) and/or the clicks `[(x, y, label), ...]`; for a
    class-aware model, the structure ("<id> <name>") the box is for; `tta` the test-time mirroring (`segment`'s)."""
    if image is None:
        raise gr.Error("Upload an image first.")
    array = np.asarray(image)
    height, width = array.shape[:2]
    values = list(box_values)
    box = None if any(v is None for v in values) or values == [0, 0, 0, 0] else [float(v) for v in values]
    points = [[float(x), float(y)] for x, y, _ in clicks] or None
    labels = [int(label) for _, _, label in clicks] or None
    classes = None
    if structure_choices(model):
        if box is None:
            raise gr.Error("This model is class-aware: type the box of the structure chosen under 'Structure'.")
        classes = [int(str(structure or structure_choices(model)[0]).split()[0])]
    try:
        result = segment(
            model, array, box=box, points=points, labels=labels,
            output_size=output_grid(height, width, resolution), processor=processor, classes=classes, tta=tta,
        )  # fmt: skip
    except ValueError as error:
        raise gr.Error(str(error)) from error
    mask = (result.mask > 0).astype(np.uint8) * 255
    path = os.path.join(tempfile.mkdtemp(prefix="imedsam-"), "mask.png")
    Image.fromarray(mask).save(path)
    area = float((mask > 0).mean())
    info = f"mask {mask.shape[1]}x{mask.shape[0]}, foreground {100 * area:.1f}%"
    if clicks:
        info += f", {len(clicks)} click(s)"
    if tta != "none":
        info += f", {len(TTA_MIRRORS[tta])} mirrors averaged"
    if points and (caveat := clicks_caveat(model, with_box=box is not None)):
        info += f"; {caveat}"
    if result.mask_source == "sam" and model.config.use_implicit_decoder:
        info += "; SAM's own mask: this model's implicit decoder was never trained"
    return overlay(array, result.mask, boxes=box, points=points, labels=labels), path, info


#: Scans the Volume tab takes (`.gz`: a file picker matches `x.nii.gz` by its last extension); a DICOM series comes as
#: a `.zip` of its folder, a multi-frame (enhanced) DICOM scan as its `.dcm` file.
SCAN_SUFFIXES = [".nii", ".nii.gz", ".gz", ".nrrd", ".mha", ".dcm", ".zip"]


#: What a click on the Volume tab's slice does: a box's corner, or a correction (foreground: True).
BOX_CORNER = "box corner"
CLICK_MODES = {BOX_CORNER: None, "add to the structure": True, "remove (background)": False}


@dataclass
class VolumeSession:
    """One scan in the Volume tab: the scan as read, the slices the model sees (`SliceEmbeddings.images`: each slice
    encoded once over all runs on it), the boxes drawn, the last run's labels.

    Attributes:
        boxes: `{"id", "box" ([x0, y0, x1, y1] pixels of the shown slice), "slice", "first", "last"}` per structure.
        labels: `(X, Y, Z)` class ids on the scan's stored grid (the last run's), and `shown`: the same in the view.
        corner: a box's first corner `(x, y)`, clicked on slice `corner_slice`, waiting for the second.
        stem: the upload's name without its extension (a `.zip`'s, not its series folder's), the outputs' names.
        segmented: the labels "Segment volume" gave; `clicks`, the corrections clicked since, `(label, stored voxel)`
            in order (label 0: background), which `labels` are `segmented` corrected with.
    """

    volume: Volume
    view: SliceView
    embeddings: SliceEmbeddings
    window: object
    boxes: list[dict] = field(default_factory=list)
    labels: np.ndarray | None = None
    shown: np.ndarray | None = None
    corner: tuple[float, float] | None = None
    corner_slice: int = -1
    stem: str = "scan"
    segmented: np.ndarray | None = None
    clicks: list[tuple[int, tuple[int, int, int]]] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return self.view.view_shape[2]


def scan_path(path: str) -> str:
    """The scan an upload holds: the file itself, or the one DICOM series (or multi-frame scan) in a `.zip`."""
    if not str(path).lower().endswith(".zip"):
        return path
    folder = tempfile.mkdtemp(prefix="imedsam-series-")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(folder)  # member names are made safe: no absolute paths, no `..`
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{os.path.basename(path)}: not a readable .zip ({error})") from error
    series = dicom_series_in(folder)
    if len(series) != 1:
        raise ValueError(
            f"{os.path.basename(path)}: {len(series)} DICOM scans in it; zip the folder of one series (its slices)"
        )
    return str(series[0])


def load_scan(model, processor, path: str | None, window: str = "") -> tuple[VolumeSession, str]:
    """The Volume tab's upload: the scan read as `imedsam predict` reads it and windowed as the model's training
    slices were (`resolve_window`), or with `window` (a preset such as `abdomen`, `level,width` in HU, or `mr`)."""
    if not path:
        raise gr.Error("Upload a scan first.")
    try:
        volume = read_volume(scan_path(path))
        chosen = resolve_window(volume.data, window.strip() or None, model.config, volume.name, volume.modality)
        embeddings = SliceEmbeddings(model, volume, processor=processor, window=chosen)
    except (ValueError, ImportError, OSError) as error:
        raise gr.Error(str(error)) from error
    stem = Path(path).stem if str(path).lower().endswith(".zip") else volume_name(path)
    session = VolumeSession(volume, SliceView.of(volume), embeddings, chosen, stem=stem)
    width, height, depth = session.view.view_shape
    spacing = " x ".join(f"{v:.2f}" for v in volume.spacing)
    how = (
        "as stored (8-bit)" if chosen is None else window_text(chosen if is_mr_window(chosen) else parse_window(chosen))
    )
    info = f"{stem}: {depth} slices of {width}x{height} ({spacing} mm), shown {how}"
    return session, info


#: The shown slice's longest side at least this many screen pixels: a small slice (BTCV's 257 px) is drawn enlarged,
#: each pixel a square block, so that a box's corners can be clicked on small organs.
SHOWN_SIDE = 512


def shown_scale(session: VolumeSession) -> int:
    """How many screen pixels each slice pixel is drawn as, along each side."""
    width, height, _ = session.view.view_shape
    return max(1, -(-SHOWN_SIDE // max(width, height)))


def slice_position(session: VolumeSession, index) -> tuple[float, float]:
    """A click's `(x, y)` on the drawn slice (`gr.SelectData.index`) in the slice's own pixels."""
    scale = shown_scale(session)
    return tuple((float(v) + 0.5) / scale - 0.5 for v in index)  # type: ignore[return-value]


def volume_picture(session: VolumeSession | None, z: float) -> np.ndarray | None:
    """Slice `z` as the model sees it, each pixel drawn `shown_scale` screen pixels wide: the last run's labels in
    their colours, the boxes drawn on it, a box's first corner waiting for its second (a ring)."""
    if session is None:
        return None
    z = int(np.clip(int(z), 0, session.depth - 1))
    scale = shown_scale(session)
    grey = slice_image(session.embeddings.images, z)
    labels = np.zeros(grey.shape, np.uint8) if session.shown is None else slice_image(session.shown, z)
    boxes = [
        [v * scale + (scale - 1) * (k > 1) for k, v in enumerate(e["box"])] for e in session.boxes if e["slice"] == z
    ]
    points = None
    if session.corner is not None and session.corner_slice == z:
        points = [[v * scale + (scale - 1) / 2 for v in session.corner]]
    enlarged = np.repeat(np.repeat(np.repeat(grey[..., None], 3, axis=-1), scale, axis=0), scale, axis=1)
    labels = np.repeat(np.repeat(labels, scale, axis=0), scale, axis=1)
    return np.asarray(overlay(enlarged, labels, boxes=boxes or None, points=points, class_colours=True))


def pick_corner(session: VolumeSession | None, z: float, x: float, y: float) -> list[float] | None:
    """A click on the shown slice (`x`, `y` in its pixels, rounded to the pixel): the first sets a box's corner (None:
    waiting), the second on the same slice the opposite one, giving the box `[x0, y0, x1, y1]`."""
    if session is None:
        raise gr.Error("Upload a scan first.")
    x, y = float(round(x)), float(round(y))  # a click picks a pixel
    if session.corner is None or session.corner_slice != int(z):
        session.corner, session.corner_slice = (x, y), int(z)
        return None
    (cx, cy), session.corner, session.corner_slice = session.corner, None, -1
    return [min(cx, x), min(cy, y), max(cx, x), max(cy, y)]


def add_volume_box(model, session: VolumeSession | None, z, box_values, first, last, structure=None) -> str:
    """The "Add box" button: the box on slice `z` for the structure chosen (a class-aware model's; a one-class model's
    boxes are structures 1, 2, ... in the order drawn), with its first and last slice; a structure given again is
    replaced. Returns the boxes as a list for the page.

    The slices are asked for, not taken as the whole scan: from a key slice propagation goes on until the model's
    mask is empty, which a trained model's seldom is, so past the organ's ends it segments its neighbours (the
    shipped CT model, each organ's box on its middle slice, mean 13-organ 3-D Dice with the organs' slices / the whole
    scan's: validation 0.773 / 0.518, test 0.788 / 0.483; docs/results.md)."""
    if session is None:
        raise gr.Error("Upload a scan first.")
    values = list(box_values)
    if any(v is None for v in values) or values == [0, 0, 0, 0]:
        raise gr.Error("Draw the box first: click two opposite corners on the slice, or type x0, y0, x1, y1.")
    z = int(z)
    if first is None or last is None:
        raise gr.Error(
            "Give the structure's first and last slice: move to where it begins and press 'First slice: this one', "
            "to where it ends and press 'Last slice: this one' (beyond them the model segments its neighbours)."
        )
    first, last = int(first), int(last)
    if not first <= z <= last:
        raise gr.Error(f"The box is on slice {z}, outside its structure's slices {first}..{last}.")
    try:
        session.view.slice_box(values, first, last)  # checked now: a bad box is refused at its press
    except ValueError as error:
        raise gr.Error(str(error)) from error
    names = structure_names_of(model.config)
    if names:
        class_id = int(str(structure or structure_choices(model)[0]).split()[0])
    else:
        class_id = max((entry["id"] for entry in session.boxes), default=0) + 1
        if class_id > 255:
            raise gr.Error("255 structures at most in one label volume.")
    entry = {"id": class_id, "box": [float(v) for v in values], "slice": z, "first": first, "last": last}
    session.boxes = [other for other in session.boxes if other["id"] != class_id] + [entry]
    return boxes_text(model, session)


def structure_name(model, class_id: int) -> str:
    """A structure's name: a class-aware model's, else `structure <id>`."""
    return (structure_names_of(model.config) or {}).get(class_id, f"structure {class_id}")


def boxes_text(model, session: VolumeSession | None) -> str:
    """The boxes drawn, one line each."""
    if session is None:
        return ""
    lines = []
    for entry in session.boxes:
        corners = ", ".join(f"{v:.0f}" for v in entry["box"])
        lines.append(
            f"{structure_name(model, entry['id'])}: [{corners}] on slice {entry['slice']}, slices "
            f"{entry['first']}..{entry['last']}"
        )
    return "\n".join(lines)


def segment_volume_request(model, processor, session: VolumeSession | None) -> tuple[list[str], str]:
    """The "Segment volume" button: every box propagated from its slice outwards (`segment_volume` with key slices);
    the label volume and the boxes written (`volume_outputs`)."""
    if session is None:
        raise gr.Error("Upload a scan first.")
    if not session.boxes:
        raise gr.Error("Add a box first: draw it on a slice where the structure is, then press 'Add box'.")
    boxes_3d, key_slices = stored_boxes(session)
    try:
        labels = segment_volume(
            model, session.volume, processor=processor, boxes_3d=boxes_3d, key_slices=key_slices,
            window=session.window, slice_embeddings=session.embeddings, progress=False,
        )  # fmt: skip
    except ValueError as error:
        raise gr.Error(str(error)) from error
    session.segmented, session.clicks = labels, []
    session.labels, session.shown = labels, session.view.to_view(labels)
    return volume_outputs(model, session)


def stored_boxes(session: VolumeSession) -> tuple[dict[int, list[int]], dict[int, int]]:
    """The boxes drawn as `segment_volume` takes them: `boxes_3d` in stored voxel indices, `key_slices`."""
    boxes_3d = {e["id"]: session.view.slice_box(e["box"], e["first"], e["last"]) for e in session.boxes}
    return boxes_3d, {e["id"]: e["slice"] for e in session.boxes}


def volume_outputs(model, session: VolumeSession) -> tuple[list[str], str]:
    """The session's labels written (the scan's format, a NIfTI's structures named in its header) beside the boxes as
    `imedsam predict --boxes` takes them (stored voxel indices) and the corrections clicked as `--corrections` takes
    them, if any; each structure's volume in mL."""
    labels = session.labels
    boxes_3d, key_slices = stored_boxes(session)
    folder = tempfile.mkdtemp(prefix="imedsam-")
    suffix = label_volume_suffix(session.volume.path) if session.volume.path is not None else ".nii.gz"
    target = os.path.join(folder, f"{session.stem}_labels{suffix}")
    written = write_label_volume(labels, session.volume, target, structure_names_of(model.config))
    prompts = os.path.join(folder, f"{session.stem}_boxes.json")
    with open(prompts, "w") as stream:
        json.dump({str(c): {"box": box, "key_slice": key_slices[c]} for c, box in boxes_3d.items()}, stream, indent=1)
    files = [str(written), prompts]
    if session.clicks:  # as `--corrections` takes them: {structure id or "background": [[x, y, z], ...]}
        clicks: dict[str, list[list[int]]] = {}
        for label, voxel in session.clicks:
            clicks.setdefault(str(label) if label else "background", []).append([int(v) for v in voxel])
        files.append(os.path.join(folder, f"{session.stem}_clicks.json"))
        with open(files[-1], "w") as stream:
            json.dump(clicks, stream)
    found = label_statistics(labels, session.volume, {c: structure_name(model, c) for c in boxes_3d})["structures"]
    parts = [f"{name} {values['volume_ml']:.1f} mL" for name, values in found.items()]
    missed = [structure_name(model, c) for c in boxes_3d if not (labels == c).any()]
    info = "; ".join(parts) or "nothing found"
    if missed:
        info += f"; nothing found for {', '.join(missed)} (its box's slice gave an empty mask)"
    return files, info


def correction_choices(model, session: VolumeSession | None) -> list[str]:
    """The structures a foreground correction may add to: those boxed, as `"<id> <name>"`."""
    return [f"{e['id']} {structure_name(model, e['id'])}" for e in (session.boxes if session else [])]


def correct_click(
    model, processor, session: VolumeSession | None, z, x: float, y: float, foreground: bool, structure=None
) -> tuple[list[str], str]:
    """A correction clicked on the shown slice once the scan is segmented: a foreground click adds its pixel to the
    structure chosen, a background click takes it from the structure holding it (`apply_clicks`)."""
    if session is None or session.segmented is None:
        raise gr.Error("Segment the volume first: corrections change its labels.")
    width, height, _ = session.view.view_shape
    column, row = int(np.clip(round(x), 0, width - 1)), int(np.clip(round(y), 0, height - 1))
    voxel = tuple(session.view.stored_box([column, height - 1 - row, int(z)] * 2)[:3])
    label = 0
    if foreground:
        if not structure:
            raise gr.Error("Choose the structure the click adds to ('Structure to add to').")
        label = int(str(structure).split()[0])
    return apply_clicks(model, processor, session, [*session.clicks, (label, voxel)])


def apply_clicks(model, processor, session: VolumeSession, clicks: list) -> tuple[list[str], str]:
    """The segmented labels corrected with all of `clicks`, as `imedsam predict --boxes <boxes.json> --corrections
    <clicks.json>` corrects them (`refine_volume`: a slice's mask grown to a click or the structure extended into the
    slices it was missing from; a stray piece removed or a mask's doubtful piece trimmed), so the files written give
    the same labels from the command line; each slice encoded once over the session, a replay costs decoder calls."""
    boxes_3d, _ = stored_boxes(session)
    grouped: dict[int, list[tuple[int, int, int]]] = {}
    for label, voxel in clicks:
        grouped.setdefault(label, []).append(voxel)
    try:
        refinement = refine_volume(
            model, session.volume, session.segmented, grouped, boxes_3d=boxes_3d, processor=processor,
            window=session.window, slice_embeddings=session.embeddings,
        )  # fmt: skip
    except ValueError as error:
        raise gr.Error(str(error)) from error
    session.clicks = list(clicks)
    session.labels, session.shown = refinement.labels, session.view.to_view(refinement.labels)
    files, info = volume_outputs(model, session)
    return files, f"{refinement_text(refinement)}; {info}" if clicks else info


def undo_correction(model, processor, session: VolumeSession | None) -> tuple[list[str], str]:
    """The "Undo" button: the labels without the last correction clicked."""
    if session is None or not session.clicks:
        raise gr.Error("No correction to undo.")
    return apply_clicks(model, processor, session, session.clicks[:-1])


def box_fields(prefix: str = "") -> list[gr.Number]:
    """A box's four fields in a row: x0, y0, x1, y1 in pixels, labelled with `prefix`."""
    with gr.Row():
        return [gr.Number(label=f"{prefix}{name}", value=0, precision=1) for name in ("x0", "y0", "x1", "y1")]


def build_demo(model_name: str, device: str = "auto", cpu_allocator: str = "keep") -> gr.Blocks:
    """The app; on a CPU, `cpu_allocator="keep"` tunes this process's `malloc` as `imedsam predict` does
    (`imedsam_hf.runtime.keep_freed_memory`: a box request on a polyp 0.94 -> 0.73 s on 2 cores)."""
    resolved = resolve_device(device)
    tuned = runtime.tune_cpu_allocator(cpu_allocator, resolved)
    if tuned:
        print(tuned)
    model, processor = load_model(model_name, device=resolved)

    def run(image, x0, y0, x1, y1, clicks, resolution, structure, tta):
        return segment_request(model, processor, image, (x0, y0, x1, y1), clicks, resolution, structure, tta)

    def add_click(clicks, kind, event: gr.SelectData):
        x, y = event.index
        clicks = [*clicks, (float(x), float(y), 1 if kind == "foreground" else 0)]
        return clicks, "; ".join(f"{x:.0f},{y:.0f},{label}" for x, y, label in clicks)

    with gr.Blocks(title="I-MedSAM") as demo:
        gr.Markdown(
            f"# I-MedSAM\nModel: `{model_name}`. Upload an image, type a box (pixels) and/or click on the image "
            "(foreground or background clicks), choose the resolution; or segment a scan in the Volume tab."
            + ("" if model.config.learned_clicks else " This model learned box prompts only: give a box.")
        )
        choices = structure_choices(model)
        with gr.Tab("Image"):
            clicks = gr.State([])
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="numpy", label="Image", image_mode="RGB")
                    dicom = gr.File(
                        label="... or a 2-D DICOM, .mha, .nrrd or .nii.gz file", file_types=UPLOAD_SUFFIXES,
                        type="filepath",
                    )  # fmt: skip
                    x0, y0, x1, y1 = box_fields()
                    with gr.Row():
                        kind = gr.Radio(["foreground", "background"], value="foreground", label="Next click")
                        clear = gr.Button("Clear clicks")
                    listed = gr.Textbox(label="Clicks (x,y,label)", interactive=False)
                    resolution = gr.Radio(RESOLUTIONS, value="native", label="Output resolution")
                    tta = gr.Radio(
                        list(TTA_MIRRORS), value="none", label="Test-time mirroring (h, v: 2 passes; hv: 4, averaged)"
                    )
                    structure = gr.Dropdown(
                        choices, value=choices[0] if choices else None, label="Structure", visible=bool(choices)
                    )
                    button = gr.Button("Segment", variant="primary")
                with gr.Column():
                    result = gr.Image(label="Mask overlay", type="numpy")
                    download = gr.File(label="Mask (0/255 PNG)")
                    info = gr.Textbox(label="Info", interactive=False)
        with gr.Tab("Volume"):
            # A scan's slice embeddings take about 4 MiB a slice (600 MiB for a 150-slice CT): a session's go after
            # an hour unused, so a shared Space does not keep every visitor's.
            session = gr.State(None, time_to_live=3600)
            with gr.Row():
                with gr.Column():
                    scan = gr.File(
                        label="Scan: NIfTI, .nrrd, .mha, a multi-frame .dcm, or a DICOM series as a .zip",
                        file_types=SCAN_SUFFIXES, type="filepath", elem_id="volume-scan",
                    )  # fmt: skip
                    window = gr.Textbox(
                        label="Window (empty: the model's; a preset such as abdomen, 'level,width' in HU, or mr)"
                    )
                    slice_index = gr.Slider(0, 1, value=0, step=1, label="Slice")
                    shown = gr.Image(
                        label="Slice (click two opposite corners of a box)",
                        type="numpy",
                        interactive=False,
                        elem_id="volume-slice",
                    )
                with gr.Column():
                    vx0, vy0, vx1, vy1 = box_fields("box ")
                    with gr.Row():
                        first = gr.Number(label="first slice of the structure", value=None, precision=0)
                        last = gr.Number(label="last slice of the structure", value=None, precision=0)
                    with gr.Row():
                        set_first = gr.Button("First slice: this one")
                        set_last = gr.Button("Last slice: this one")
                    volume_structure = gr.Dropdown(
                        choices, value=choices[0] if choices else None, label="Structure of the box",
                        visible=bool(choices),
                    )  # fmt: skip
                    with gr.Row():
                        add = gr.Button("Add box")
                        clear_boxes = gr.Button("Clear boxes")
                    boxes = gr.Textbox(label="Boxes", interactive=False)
                    go = gr.Button("Segment volume", variant="primary")
                    with gr.Row():
                        click_mode = gr.Radio(
                            list(CLICK_MODES),
                            value=BOX_CORNER,
                            label="A click on the slice (corrections: once segmented)",
                        )
                        correct_structure = gr.Dropdown([], label="Structure to add to")
                    undo = gr.Button("Undo the last correction")
                    outputs = gr.File(
                        label="Label volume, boxes and clicks (imedsam predict --boxes, --corrections)",
                        file_count="multiple",
                    )
                    volume_info = gr.Textbox(label="Result", interactive=False)
        image.select(add_click, inputs=[clicks, kind], outputs=[clicks, listed])
        clear.click(lambda: ([], ""), outputs=[clicks, listed])
        image.upload(lambda: ([], ""), outputs=[clicks, listed])
        dicom.upload(
            lambda path: (file_upload(path, model.config), [], ""), inputs=dicom, outputs=[image, clicks, listed]
        )
        inputs = [image, x0, y0, x1, y1, clicks, resolution, structure, tta]
        button.click(run, inputs=inputs, outputs=[result, download, info])

        def opened(path, window_value):
            loaded, text = load_scan(model, processor, path, window_value or "")
            middle = loaded.depth // 2
            slider = gr.Slider(minimum=0, maximum=loaded.depth - 1, value=middle, step=1, label="Slice")
            return loaded, slider, volume_picture(loaded, middle), "", text, None, None

        def clicked(current, z, mode, chosen, event: gr.SelectData):
            if current is None:
                raise gr.Error("Upload a scan first.")
            x, y = slice_position(current, event.index)
            if mode != BOX_CORNER:
                files, text = correct_click(
                    model, processor, current, z, float(x), float(y), CLICK_MODES[mode], chosen
                )  # fmt: skip
                return (*[gr.update()] * 4, volume_picture(current, z), files, text)
            box = pick_corner(current, z, float(x), float(y))
            corners = [gr.update()] * 4 if box is None else box
            return (*corners, volume_picture(current, z), gr.update(), gr.update())

        def added(current, z, bx0, by0, bx1, by1, low, high, chosen):
            text = add_volume_box(model, current, z, (bx0, by0, bx1, by1), low, high, chosen)
            return text, volume_picture(current, z)

        def cleared(current, z):
            if current is not None:
                current.boxes, current.corner = [], None
            return "", volume_picture(current, z)

        def segmented(current, z):
            files, text = segment_volume_request(model, processor, current)
            options = correction_choices(model, current)
            return files, text, volume_picture(current, z), gr.Dropdown(options, value=options[0])

        def undone(current, z):
            files, text = undo_correction(model, processor, current)
            return files, text, volume_picture(current, z)

        volume_upload = [session, slice_index, shown, boxes, volume_info, first, last]
        scan.upload(opened, inputs=[scan, window], outputs=volume_upload)
        window.submit(opened, inputs=[scan, window], outputs=volume_upload)
        slice_index.input(volume_picture, inputs=[session, slice_index], outputs=shown)
        shown.select(
            clicked, inputs=[session, slice_index, click_mode, correct_structure],
            outputs=[vx0, vy0, vx1, vy1, shown, outputs, volume_info],
        )  # fmt: skip
        box_inputs = [session, slice_index, vx0, vy0, vx1, vy1, first, last, volume_structure]
        add.click(added, inputs=box_inputs, outputs=[boxes, shown])
        set_first.click(lambda z: z, inputs=slice_index, outputs=first)
        set_last.click(lambda z: z, inputs=slice_index, outputs=last)
        clear_boxes.click(cleared, inputs=[session, slice_index], outputs=[boxes, shown])
        go.click(segmented, inputs=[session, slice_index], outputs=[outputs, volume_info, shown, correct_structure])
        undo.click(undone, inputs=[session, slice_index], outputs=[outputs, volume_info, shown])
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default=os.environ.get("IMEDSAM_DEMO_MODEL", "litemedsam"), help="model to serve")
    parser.add_argument("--port", type=int, default=7860, help="port on --host")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (local only by default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--cpu-allocator", default="keep", choices=["keep", "default"],
        help="on a CPU under glibc: 'keep' freed memory in the process (faster requests), as imedsam predict does",
    )  # fmt: skip
    args = parser.parse_args()
    build_demo(args.model, args.device, args.cpu_allocator).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
