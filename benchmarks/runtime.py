#!/usr/bin/env python
"""The image encoder on torch vs ONNX Runtime vs OpenVINO (`imedsam_hf.runtime`): seconds per slice, start-up, error.

    python benchmarks/runtime.py --num_threads 2 --repeats 7 --json benchmarks/results/runtime_litemedsam.json
    python benchmarks/runtime.py --adapted                          # a trained-style I-MedSAM (LoRA + FA active)
    python benchmarks/runtime.py --int8 --num_calibration 16

Every variant runs in this one process with the same threads; the timed rounds interleave the variants (round r
times torch, then onnx, then openvino, ...) so that load from other processes hits them alike. `ratio` is torch's
median over the variant's (>1: faster than torch); read ratios, not seconds, on a shared machine.

`first_load_s` is export + checks + compilation into an empty folder; `second_load_s` the same call again (the
cached files, OpenVINO's compiled-model cache). Errors are measured against the torch encoder on real images that
the int8 calibration did not see: max abs error of the image embeddings, of SAM's mask logits (`sam_logits`, with
each image's box) and the share of mask pixels (logits > 0) that agree with torch's.

OpenVINO's bf16 (`precision="bf16"`, offered) is timed beside its fp32 (its first_load_s: a first export for bf16).
Reduced precisions measured here and not offered by `imedsam_hf.runtime` (see its `PRECISIONS`): `--int8`
quantizes the fp32 export after the fact (its first_load_s is the quantization alone): OpenVINO with NNCF
(`nncf.quantize`, transformer preset, calibrated on `--num_calibration` real images), ONNX Runtime with
`quantize_static` (QDQ, per-channel int8 weights, uint8 activations, constant-weight MatMuls only) and
`quantize_dynamic` (int8 weights, activations quantized per call; "int8-dynamic"). fp16/bf16: the JSON records what
OpenVINO's CPU plugin computes in when asked for them (`precision_hints`): fp32 on a CPU without such arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_description, report
from PIL import Image

import imedsam_hf
from imedsam_hf import runtime
from imedsam_hf.loading import LITEMEDSAM, load_model

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "EndoTect2020-polyp"
COLUMNS = [
    "backend",
    "precision",
    "median_s",
    "min_s",
    "ratio",
    "first_load_s",
    "second_load_s",
    "embedding_error",
    "sam_logit_error",
    "mask_agreement",
]


def real_images(folder: Path, count: int) -> list[tuple[Image.Image, list[float]]]:
    """`count` images of `folder/images` with the box of their mask (`folder/masks`), or a centred box."""
    paths = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(paths) < count:
        raise SystemExit(f"{folder / 'images'}: {len(paths)} images, {count} needed.")
    samples = []
    for path in paths[:count]:
        image = Image.open(path).convert("RGB")
        mask_path = folder / "masks" / f"{path.stem}.png"
        box = [image.width * 0.25, image.height * 0.25, image.width * 0.75, image.height * 0.75]
        if mask_path.is_file():
            mask = np.asarray(Image.open(mask_path).convert("L")) > 127
            if mask.any():
                ys, xs = np.nonzero(mask)
                box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        samples.append((image, box))
    return samples


def build(adapted: bool):
    """LiteMedSAM, or a trained-style I-MedSAM on it: the recipe's LoRA + frequency adapter, moved off their init."""
    if not adapted:
        return load_model(LITEMEDSAM)
    from peft import get_peft_model

    model, processor = load_model(
        LITEMEDSAM, eval_mode=False, config_overrides={"use_implicit_decoder": True, "frequency_fusion_gate": True}
    )
    model = get_peft_model(model, imedsam_hf.imedsam_peft_config(model.config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval(), processor


def precision_hints(folder: Path) -> dict[str, str]:
    """What OpenVINO's CPU plugin computes in when an fp32 export is compiled with each reduced-precision hint."""
    import openvino as ov

    core = ov.Core()
    hints = {}
    for hint in ("f16", "bf16"):
        try:
            compiled = core.compile_model(
                str(folder / runtime.MODEL_FILES["openvino"]), "CPU", {"INFERENCE_PRECISION_HINT": hint}
            )
            effective = compiled.get_property("INFERENCE_PRECISION_HINT")
            hints[hint] = effective.get_type_name() if hasattr(effective, "get_type_name") else str(effective)
        except RuntimeError as error:
            hints[hint] = f"refused: {error}"
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    hints["cpu_capabilities"] = " ".join(capabilities)
    return hints


def quantized(backend: str, fp32_encoder, calibration: torch.Tensor, threads: int, folder: Path) -> dict[str, tuple]:
    """int8 variants of an fp32 export: {precision label: (encoder, seconds to quantize)}."""
    variants = {}
    metadata = {k: v for k, v in fp32_encoder.metadata.items() if k not in ("files", "probe_error")}
    source = fp32_encoder.folder / runtime.MODEL_FILES[backend]
    if backend == "openvino":
        import nncf
        import openvino as ov

        start = time.perf_counter()
        ov_model = ov.Core().read_model(str(source))
        dft = [op.get_friendly_name() for op in ov_model.get_ops() if op.get_type_name() in ("DFT", "RDFT")]
        quantized_model = nncf.quantize(
            ov_model,
            nncf.Dataset([image[None].numpy() for image in calibration]),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=dft, validate=False) if dft else None,
        )
        out = folder / "openvino-int8"
        out.mkdir(parents=True)
        ov.save_model(quantized_model, str(out / runtime.MODEL_FILES[backend]), compress_to_fp16=False)
        seconds = time.perf_counter() - start
        variants["int8"] = (
            runtime.RuntimeVisionEncoder(backend, out, {**metadata, "precision": "int8"}, None, threads),
            seconds,
        )
        return variants
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter(calibration)

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {runtime.INPUT_NAME: image[None].numpy()}

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    prepared = folder / "onnx-prepared.onnx"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    out = folder / "onnx-int8"
    out.mkdir(parents=True)
    quantize_static(
        str(prepared),
        str(out / runtime.MODEL_FILES[backend]),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"MatMulConstBOnly": True},
    )
    seconds = time.perf_counter() - start
    variants["int8"] = (
        runtime.RuntimeVisionEncoder(backend, out, {**metadata, "precision": "int8"}, None, threads),
        seconds,
    )
    start = time.perf_counter()
    out = folder / "onnx-int8-dynamic"
    out.mkdir(parents=True)
    quantize_dynamic(str(prepared), str(out / runtime.MODEL_FILES[backend]), weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - start
    encoder = runtime.RuntimeVisionEncoder(backend, out, {**metadata, "precision": "int8-dynamic"}, None, threads)
    variants["int8-dynamic"] = (encoder, seconds)
    return variants


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(runtime.BACKENDS), choices=runtime.BACKENDS)
    parser.add_argument("--int8", action="store_true", help="also measure int8 post-training quantization")
    parser.add_argument("--adapted", action="store_true", help="a trained-style I-MedSAM (LoRA + FA active)")
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder with images/ (and masks/)")
    parser.add_argument("--num_calibration", type=int, default=8, help="int8 calibration images")
    parser.add_argument("--num_eval", type=int, default=4, help="images the errors are measured on")
    parser.add_argument("--cache_dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)

    model, processor = build(args.adapted)
    samples = real_images(args.images, args.num_eval + args.num_calibration)
    evaluation, calibration = samples[: args.num_eval], samples[args.num_eval :]
    inputs = processor(images=[s[0] for s in evaluation], input_boxes=[s[1] for s in evaluation])
    pixel_values, boxes = inputs["pixel_values"], inputs["input_boxes"]
    calibration_pixels = None
    if calibration and args.int8:
        calibration_pixels = processor(images=[s[0] for s in calibration])["pixel_values"]

    torch_encoder = runtime.torch_vision_encoder(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def encode(encoder, images):
        base.vision_encoder = encoder
        with torch.inference_mode():
            return model.encode_image(images)

    def sam_logits(embeddings):
        with torch.inference_mode():
            return model(image_embeddings=embeddings, input_boxes=boxes, full_sam_logits=True).sam_logits

    reference = encode(torch_encoder, pixel_values)
    reference_logits = sam_logits(reference)
    variants = {("torch", "fp32"): {"encoder": torch_encoder, "row": {"backend": "torch", "precision": "fp32"}}}
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="imedsam-runtime-bench-"))
    hints = {}
    for backend in [b for b in args.backends if b != "torch"]:
        if not runtime.backend_available(backend):
            print(f"{backend}: not installed, skipped", file=sys.stderr)
            continue
        options = dict(num_threads=args.num_threads, cache_dir=cache)
        row = {"backend": backend, "precision": "fp32"}
        try:
            start = time.perf_counter()
            encoder = runtime.export_vision_encoder(model, backend, **options)
            row["first_load_s"] = time.perf_counter() - start
            del encoder
            start = time.perf_counter()
            encoder = runtime.export_vision_encoder(model, backend, **options)
            row["second_load_s"] = time.perf_counter() - start
        except (ImportError, RuntimeError) as error:
            print(f"{backend}: {error}", file=sys.stderr)
            continue
        row["probe_error"] = encoder.metadata.get("probe_error")
        found = {"fp32": (encoder, None)}
        if backend == "openvino":
            hints = precision_hints(encoder.folder)
        for precision in runtime.PRECISIONS[backend][1:]:  # the offered reduced precisions (OpenVINO's bf16)
            start = time.perf_counter()
            reduced = runtime.export_vision_encoder(model, backend, precision=precision, **options)
            found[precision] = (reduced, time.perf_counter() - start)
        if calibration_pixels is not None:
            try:
                found.update(quantized(backend, encoder, calibration_pixels, args.num_threads, cache / "quantized"))
            except Exception as error:  # an optional measurement: report, go on
                print(f"{backend} int8: {type(error).__name__}: {error}", file=sys.stderr)
        for precision, (variant, seconds) in found.items():
            variant_row = (
                row if precision == "fp32" else {"backend": backend, "precision": precision, "first_load_s": seconds}
            )
            embeddings = encode(variant, pixel_values)
            logits = sam_logits(embeddings)
            variant_row["embedding_error"] = float((embeddings - reference).abs().max())
            variant_row["sam_logit_error"] = float((logits - reference_logits).abs().max())
            variant_row["mask_agreement"] = float(((logits > 0) == (reference_logits > 0)).float().mean())
            variants[(backend, precision)] = {"encoder": variant, "row": variant_row}

    # Interleaved timing: one slice (batch 1) per call, cycling over the evaluation images.
    times = {key: [] for key in variants}
    for variant in variants.values():  # warm-up
        encode(variant["encoder"], pixel_values[:1])
    for round_index in range(args.repeats):
        image = pixel_values[round_index % len(pixel_values)][None]
        for key, variant in variants.items():
            start = time.perf_counter()
            encode(variant["encoder"], image)
            times[key].append(time.perf_counter() - start)
    base.vision_encoder = torch_encoder
    torch_median = statistics.median(times[("torch", "fp32")])
    rows = []
    for key, variant in variants.items():
        row = variant["row"]
        row["median_s"] = statistics.median(times[key])
        row["min_s"] = min(times[key])
        row["ratio"] = torch_median / row["median_s"]
        rows.append(row)
    result = {
        "benchmark": "runtime",
        "model": "i-medsam (litemedsam, LoRA + FA randomised)" if args.adapted else LITEMEDSAM,
        "machine": machine_description(torch.device("cpu")),
        "num_threads": args.num_threads,
        "repeats": args.repeats,
        "num_eval_images": len(evaluation),
        "num_calibration_images": len(calibration),
        "precision_hints": hints,
        "versions": {b: runtime._runtime_version(b) for b in runtime.BACKENDS if runtime.backend_available(b)},
        "rows": rows,
    }
    header = f"Image encoder per slice, {result['model']}, {result['machine']}; ratio = torch median / median"
    return report(result, header, COLUMNS, args.json)


if __name__ == "__main__":
    main()
