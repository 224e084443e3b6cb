"""Browser demo (Gradio, the Hugging Face Spaces convention): upload an image, type a box or click on it, get the mask.
A 2-D DICOM file (a radiograph, an ultrasound or endoscopy still) can be uploaded too: it is shown as a viewer shows it;
so can a 2-D image stored as MetaImage, NRRD or NIfTI (grand-challenge.org's `.mha`, CAMUS's `.nii.gz`).

    python demo/app.py                                         # LiteMedSAM zero-shot, offline
    python demo/app.py --model imedsam-litemedsam-polyp         # a shipped model, by name
    python demo/app.py --model outputs/litemedsam_polyp/final   # a trained I-MedSAM (folder or hub id)

A class-aware model (the shipped `imedsam-litemedsam-btcv`) asks which structure the box is for: its config records
its classes, and each box is decoded by that class's heads.

On Spaces, `app.py` is run as is; set IMEDSAM_DEMO_MODEL to choose the model.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import gradio as gr
import numpy as np
from PIL import Image

import imedsam_hf.runtime as runtime  # looked up at call time: tests replace the allocator tuning
from imedsam_hf import load_model, overlay, segment
from imedsam_hf.configuration_imedsam import is_class_aware
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
                f"{os.path.basename(path)}: not a 2-D image (a 3-D scan, or unreadable); segment scans with imedsam "
                "predict (a label volume out)."
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
            "(foreground or background clicks), choose the resolution."
            + ("" if model.config.learned_clicks else " This model learned box prompts only: give a box.")
        )
        clicks = gr.State([])
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="Image", image_mode="RGB")
                dicom = gr.File(
                    label="... or a 2-D DICOM, .mha, .nrrd or .nii.gz file", file_types=UPLOAD_SUFFIXES, type="filepath"
                )
                with gr.Row():
                    x0 = gr.Number(label="x0", value=0, precision=1)
                    y0 = gr.Number(label="y0", value=0, precision=1)
                    x1 = gr.Number(label="x1", value=0, precision=1)
                    y1 = gr.Number(label="y1", value=0, precision=1)
                with gr.Row():
                    kind = gr.Radio(["foreground", "background"], value="foreground", label="Next click")
                    clear = gr.Button("Clear clicks")
                listed = gr.Textbox(label="Clicks (x,y,label)", interactive=False)
                resolution = gr.Radio(RESOLUTIONS, value="native", label="Output resolution")
                tta = gr.Radio(
                    list(TTA_MIRRORS), value="none", label="Test-time mirroring (h, v: 2 passes; hv: 4, averaged)"
                )
                choices = structure_choices(model)
                structure = gr.Dropdown(
                    choices, value=choices[0] if choices else None, label="Structure", visible=bool(choices)
                )
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                result = gr.Image(label="Mask overlay", type="numpy")
                download = gr.File(label="Mask (0/255 PNG)")
                info = gr.Textbox(label="Info", interactive=False)
        image.select(add_click, inputs=[clicks, kind], outputs=[clicks, listed])
        clear.click(lambda: ([], ""), outputs=[clicks, listed])
        image.upload(lambda: ([], ""), outputs=[clicks, listed])
        dicom.upload(
            lambda path: (file_upload(path, model.config), [], ""), inputs=dicom, outputs=[image, clicks, listed]
        )
        inputs = [image, x0, y0, x1, y1, clicks, resolution, structure, tta]
        button.click(run, inputs=inputs, outputs=[result, download, info])
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
