"""The image encoder on a CPU runtime, ONNX Runtime or OpenVINO, in place of torch: an optional extra.

    model, processor = imedsam_hf.load_model("litemedsam")
    set_backend(model, "openvino")        # exported once, then reused from the cache
    outputs = model(pixel_values=..., input_boxes=...)    # same masks; the encoder runs on OpenVINO

`backend` follows sentence-transformers' argument (`"torch" | "onnx" | "openvino"`); the files follow optimum's
layout (`model.onnx`, `openvino_model.xml` + `.bin`). Only the image encoder (`pixel_values (B, 3, S, S)` ->
`image_embeddings (B, 256, S/4, S/4)`) moves to the runtime, the part that costs ~all of a slice's time on a CPU;
the prompt encoder, SAM's mask decoder and the implicit decoder stay in torch, so every output of
`IMedSamModel.forward` and `encode_image` keeps its meaning.

What is exported is the encoder as it is, adapters included: a trained I-MedSAM's LoRA (merged into the qkv
weights of a copy first, where it can be) and its frequency adapter, whose image spectrum (`torch.fft`) is part of
the exported graph. OpenVINO converts the encoder from torch directly (its PyTorch frontend, as optimum-intel does);
ONNX through `torch.onnx.export(dynamo=True)`. The batch axis is dynamic.

Files live in a folder keyed by a SHA-256 fingerprint of every parameter and buffer of the encoder (adapters
included), of the adapter settings that are not tensors, of the backend, precision and library versions. A folder
whose recorded fingerprint or file checksums differ (another model, weights changed since, a damaged file) is
rebuilt, never used. Each export is checked against torch on a probe image before it is kept.
OpenVINO's compiled-model cache (`CACHE_DIR`) lives inside that folder, so a second load skips compilation.

Precision: fp32 by default (SAM's mask logits within ~5e-5 of torch's), pinned (`INFERENCE_PRECISION_HINT` f32)
so that a CPU with AMX / AVX512-BF16 does not switch to bf16 by itself. OpenVINO also offers `precision="bf16"`:
the same fp32 export compiled for bf16 arithmetic, 2.3x faster than its fp32 on a CPU with AMX (4.3x torch's), its
BTCV test Dice within 0.13 points of fp32's per organ (docs/results.md); on a CPU without bf16 arithmetic OpenVINO computes in fp32
whatever the hint (a warning says so). int8 post-training quantization and fp16 were measured
(`benchmarks/runtime.py`) and are not offered: see `PRECISIONS`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import frequency_adapter_layers
from .files import file_records, records_problem
from .frequency_adapter_layers import FrequencyAdapterLayer, QVLoRALinear
from .version import __version__

BACKENDS = ("torch", "onnx", "openvino")
# Precisions each backend offers. OpenVINO's bf16 compiles the fp32 export with INFERENCE_PRECISION_HINT bf16 (AMX /
# AVX512-BF16). int8 post-training quantization (NNCF, onnxruntime's quantize_static) and fp16 were measured
# (benchmarks/runtime.py) and are not offered: int8 moved SAM's mask logits by up to 4 (OpenVINO) and 17 (ONNX
# Runtime).
PRECISIONS = {"torch": ("fp32",), "onnx": ("fp32",), "openvino": ("fp32", "bf16")}
# OpenVINO's INFERENCE_PRECISION_HINT for each precision.
_OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}
EXTRAS = {"onnx": "onnx", "openvino": "openvino"}
# The packages each backend imports, as (module, pip name): to run an export, and to make one (the ONNX exporter of
# torch needs onnx and onnxscript).
BACKEND_MODULES = {"onnx": (("onnxruntime", "onnxruntime"),), "openvino": (("openvino", "openvino"),)}
EXPORT_MODULES = {"onnx": (("onnx", "onnx"), ("onnxscript", "onnxscript")), "openvino": ()}
MODEL_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}
METADATA_FILE = "runtime.json"
FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "pixel_values", "image_embeddings"
# An export whose embeddings differ from torch's by more than this on the probe image is refused (fp32 exports
# differ by ~2e-6; the embeddings are layer-normalised, of order 1). A bf16 compilation is checked too, against
# REDUCED_PRECISION_TOLERANCE (it differs by ~0.03 on the probe image).
VERIFY_TOLERANCE = 1e-3
REDUCED_PRECISION_TOLERANCE = 0.25
MAX_BATCH = 4096

logger = logging.getLogger(__name__)
_folder_locks: dict[str, threading.Lock] = {}
_folder_locks_guard = threading.Lock()


# ----------------------------------------------------------------------------------------------------------------------
# Availability


def backend_available(backend: str) -> bool:
    """Whether `backend`'s packages are installed (`"torch"` always is)."""
    check_backend(backend)
    modules = [*BACKEND_MODULES.get(backend, ()), *EXPORT_MODULES.get(backend, ())]
    return all(importlib.util.find_spec(module) is not None for module, _ in modules)


def check_backend(backend: str, precision: str = "fp32") -> None:
    """`ValueError` for an unknown backend or precision."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(map(repr, BACKENDS))}.")
    if precision not in PRECISIONS[backend]:
        raise ValueError(
            f"precision={precision!r} is not offered for backend={backend!r}: choose one of "
            f"{', '.join(map(repr, PRECISIONS[backend]))}."
        )


def require_backend(backend: str, precision: str = "fp32") -> None:
    """Before anything is loaded: `ValueError` for an unknown backend or precision, `ImportError` naming the extra to
    install when its packages are missing (`"torch"` always passes)."""
    check_backend(backend, precision)
    if backend != "torch":
        _require(backend, exporting=True)


def _require(backend: str, exporting: bool = False) -> None:
    """Import the packages that running (and, `exporting`, making) an export needs, or raise an `ImportError`
    naming the extra to install."""
    needed = list(BACKEND_MODULES.get(backend, ()))
    if exporting:
        needed += EXPORT_MODULES.get(backend, ())
    missing = []
    for module, package in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        extra = EXTRAS[backend]
        raise ImportError(
            f"backend={backend!r} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f'installed: pip install {" ".join(missing)} (the [{extra}] extra: pip install ".[{extra}]" in a clone of '
            "imedsam-hf), or use "
            'backend="torch".'
        )


# ----------------------------------------------------------------------------------------------------------------------
# What is exported


def _base_model(model: nn.Module) -> nn.Module:
    """The `IMedSamModel` of `model` (itself, or the model inside a PEFT model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "vision_encoder"):
        raise TypeError(f"Expected an IMedSamModel (or a PEFT model around one), got {type(model).__name__}.")
    return base


def torch_vision_encoder(model: nn.Module) -> nn.Module:
    """The torch image encoder of `model` (also when a runtime encoder has replaced it)."""
    encoder = _base_model(model).vision_encoder
    return encoder.torch_encoder if isinstance(encoder, RuntimeVisionEncoder) else encoder


def traceable_image_spectrum(
    pixel_values: torch.Tensor, mode: str = "amplitude", log_scale: bool = True
) -> torch.Tensor:
    """
    `frequency_adapter_layers.image_spectrum` in a form both exporters convert: the centring (`fftshift`) is a
    `roll` of the real amplitude or phase (OpenVINO has no `fftshift` of complex tensors), the phase an `atan2`.
    The same values (amplitude: bit-identical; phase: to ~1e-7).
    """
    values = pixel_values.float()
    spectrum = torch.fft.fft2(values, norm="ortho")
    if mode == "amplitude":
        image = spectrum.abs()
        image = torch.log1p(image) if log_scale else image
    elif mode == "phase":
        image = torch.atan2(spectrum.imag, spectrum.real) / math.pi
    else:
        raise ValueError(f"`spectrum` must be 'amplitude' or 'phase', got {mode!r}.")
    height, width = image.shape[-2:]
    image = torch.roll(image, shifts=(height // 2, width // 2), dims=(-2, -1))
    mean = image.mean(dim=(-2, -1), keepdim=True)
    std = image.std(dim=(-2, -1), keepdim=True)
    return ((image - mean) / (std + 1e-6)).to(pixel_values.dtype)


@contextlib.contextmanager
def _traceable_spectrum():
    """While exporting, the frequency tokenizer computes its spectrum with `traceable_image_spectrum` (the same
    values; swapped in the module the tokenizer reads it from)."""
    original = getattr(frequency_adapter_layers, "image_spectrum", None)
    if original is None:
        yield
        return
    frequency_adapter_layers.image_spectrum = traceable_image_spectrum
    try:
        yield
    finally:
        frequency_adapter_layers.image_spectrum = original


class _EncoderForExport(nn.Module):
    """The encoder with a tensor output (`SamVisionEncoder` returns a ModelOutput)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.encoder(pixel_values)
        return outputs if isinstance(outputs, torch.Tensor) else outputs.last_hidden_state


def _adapter_layers(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in encoder.named_modules() if isinstance(module, FrequencyAdapterLayer)]


def _export_copy(encoder: nn.Module) -> tuple[nn.Module, bool]:
    """An fp32 CPU eval-mode copy of `encoder` to export, its LoRA merged into the weights where it can be (the
    graph then has plain Linear layers, which the runtimes fuse best); whether it was."""
    exported = copy.deepcopy(encoder).to(device="cpu", dtype=torch.float32).eval()
    merged = False
    for _, module in _adapter_layers(exported):
        if isinstance(module, QVLoRALinear) and not module.disable_adapters and module.active_adapters:
            try:
                module.merge()
                merged = True
            except ValueError:  # a gated LoRA depends on its input: it stays a branch of the graph
                pass
    for parameter in exported.parameters():
        parameter.requires_grad_(False)
    return _EncoderForExport(exported), merged


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    config = _base_model(model).config
    vision = config.vision_config
    size = int(getattr(vision, "image_size", None) or config.image_size)
    return int(getattr(vision, "num_channels", 3) or 3), size, size


def _runtime_version(backend: str) -> str:
    if backend == "torch":
        return torch.__version__
    module = importlib.import_module({"onnx": "onnxruntime", "openvino": "openvino"}[backend])
    return str(getattr(module, "__version__", "unknown"))


def encoder_fingerprint(model: nn.Module, backend: str = "torch", precision: str = "fp32") -> str:
    """
    SHA-256 (hex) of what an export depends on: every parameter and buffer of the torch image encoder (names,
    dtypes, shapes, values; adapter layers included, persistent or not), the encoder's structure (its `repr`),
    each adapter layer's non-tensor settings (spectrum mode, scales, chain form, active/merged adapters), the input
    shape, the backend and precision, and the versions of torch, the
    runtime, this package and the export format.
    """
    encoder = torch_vision_encoder(model)
    digest = hashlib.sha256()

    def add(text: str) -> None:
        digest.update(text.encode())
        digest.update(b"\0")

    add(f"format={FORMAT_VERSION};package={__version__};torch={torch.__version__}")
    add(f"backend={backend};precision={precision};input={_input_shape(model)}")
    if backend != "torch":
        add(f"runtime={_runtime_version(backend)}")
    add(type(encoder).__qualname__)
    add(repr(encoder))
    tensors = [*encoder.named_parameters(remove_duplicate=False), *encoder.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        add(f"{name};{tensor.dtype};{tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            digest.update(memoryview(data.view(torch.uint8).numpy()))
    for name, layer in _adapter_layers(encoder):
        settings = {
            attribute: getattr(layer, attribute, None)
            for attribute in getattr(layer, "other_param_names", ())
            if attribute != "streams"
        }
        add(
            f"{name};{type(layer).__name__};on={layer._adapters_on()};merged={list(layer.merged_adapters)};"
            f"{sorted((key, repr(value)) for key, value in settings.items())}"
        )
    return digest.hexdigest()


def probe_images(shape: tuple[int, int, int], count: int = 1, seed: int = 0) -> torch.Tensor:
    """
    `(count, C, S, S)` deterministic image-like inputs in [0, 1] (LiteMedSAM's normalisation): smooth shading,
    a few bright and dark blobs and a little noise, so the check covers the encoder's whole range.
    """
    channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height)[:, None]
    xs = torch.linspace(-1, 1, width)[None, :]
    images = []
    for _ in range(count):
        image = 0.4 + 0.2 * torch.rand(1, generator=generator) * (xs + ys)
        for _ in range(4):
            cy, cx = (torch.rand(2, generator=generator) * 1.6 - 0.8).tolist()
            radius = 0.1 + 0.3 * torch.rand(1, generator=generator).item()
            level = torch.rand(1, generator=generator).item() - 0.5
            image = image + level * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / radius**2)
        image = image.expand(channels, height, width) * (0.8 + 0.4 * torch.rand(channels, 1, 1, generator=generator))
        image = image + 0.02 * torch.randn(channels, height, width, generator=generator)
        images.append(image.clamp(0, 1))
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------------------------------
# Exporting


@contextlib.contextmanager
def _quiet_export():
    """The exporters' progress prints, tracer warnings and `torchvision is not installed` notes, silenced."""
    quiet = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "onnxscript")
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as sink:  # noqa: SIM115
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                sink.close()
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _export_onnx(module: nn.Module, shape: tuple[int, int, int], folder: Path) -> Path:
    path = folder / MODEL_FILES["onnx"]
    # torch.export specialises a size-1 axis: trace with a batch of 2 so that the batch axis stays dynamic.
    example = probe_images(shape, 2)
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5 * 2**30  # ONNX's 2 GiB protobuf
    with torch.no_grad(), _traceable_spectrum(), _quiet_export():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
            dynamo=True,
            external_data=large,
            optimize=True,
            verbose=False,
        )
    return path


def _export_openvino(module: nn.Module, shape: tuple[int, int, int], folder: Path):
    """The encoder as an OpenVINO model (converted from torch: OpenVINO's ONNX frontend mis-reads the exported
    DFT). Returns the `ov.Model`; `_save_openvino` writes it."""
    import openvino as ov

    example = probe_images(shape, 1)
    with torch.no_grad(), _traceable_spectrum(), _quiet_export():
        # Traced here without torch's trace check (convert_model's own tracing re-runs the model to check it: twice
        # the time); the export is checked against torch afterwards anyway.
        traced = torch.jit.trace(module, (example,), check_trace=False, strict=False)
        ov_model = ov.convert_model(traced, example_input=(example,), input=[ov.PartialShape([-1, *shape])])
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return ov_model


def _save_openvino(ov_model, folder: Path) -> Path:
    import openvino as ov

    path = folder / MODEL_FILES["openvino"]
    ov.save_model(ov_model, str(path), compress_to_fp16=False)  # the default would store fp16 weights
    return path


# ----------------------------------------------------------------------------------------------------------------------
# The cached folder


MODEL_FOLDER_EXPORTS = "runtime"


def model_folder_export(model_folder: str | os.PathLike, backend: str, precision: str = "fp32") -> Path:
    """Where `imedsam export --backend` writes the runtime's files beside a model folder, and where `load_model` of
    that folder looks for them: `<model_folder>/runtime/<backend>-<precision>/` (the files, `runtime.json` and
    OpenVINO's compiled-model cache)."""
    return Path(model_folder) / MODEL_FOLDER_EXPORTS / f"{backend}-{precision}"


def default_cache_dir() -> Path:
    """`$IMEDSAM_RUNTIME_CACHE`, else `$XDG_CACHE_HOME/imedsam_hf/runtime` (`~/.cache/imedsam_hf/runtime`)."""
    if os.environ.get("IMEDSAM_RUNTIME_CACHE"):
        return Path(os.environ["IMEDSAM_RUNTIME_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "imedsam_hf" / "runtime"


def _read_metadata(folder: Path) -> dict | None:
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def cached_export_is_valid(folder: str | os.PathLike, fingerprint: str) -> bool:
    """Whether `folder` holds a complete export with this fingerprint, every file matching its recorded checksum."""
    folder = Path(folder)
    metadata = _read_metadata(folder)
    if not metadata or metadata.get("fingerprint") != fingerprint or not metadata.get("files"):
        return False
    try:
        return records_problem(folder, metadata["files"]) is None
    except ValueError:  # records of another format: rebuilt
        return False


def _is_export_folder(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() or not any(folder.iterdir())


@contextlib.contextmanager
def _building(folder: Path):
    """Held while `folder` is checked and (re)built: by one thread of this process, and (POSIX `flock` on a
    `.<name>.lock` file beside it) by one process, so that parallel workers build an export once and the others
    then find it."""
    with _folder_locks_guard:
        lock = _folder_locks.setdefault(str(folder.resolve()), threading.Lock())
    with lock:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: the folder is still replaced atomically
            yield
            return
        with open(folder.parent / f".{folder.name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _install(built: Path, folder: Path) -> None:
    """Move the finished export `built` to `folder`, replacing a stale export there."""
    if folder.exists():
        if not _is_export_folder(folder):
            raise ValueError(f"`{folder}` exists and is not a runtime export folder: pick an empty or a new folder.")
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(built, folder)


# ----------------------------------------------------------------------------------------------------------------------
# The module that replaces `model.vision_encoder`


class RuntimeVisionEncoder(nn.Module):
    """
    The image encoder on ONNX Runtime or OpenVINO, used like the torch encoder it replaces:
    `forward(pixel_values (B, C, S, S)) -> image_embeddings (B, 256, S/4, S/4)`, any batch size, on the device and
    in the dtype of `pixel_values` (the runtime computes on the CPU, in fp32). No gradients flow through it.

    Attributes: `backend`, `precision` (asked for), `compute_precision` (what the runtime computes in: `"fp32"`
    where a CPU has no bf16 arithmetic), `folder` (the export), `fingerprint`, `metadata` (the folder's
    `runtime.json`), `num_threads`, `torch_encoder` (the encoder it replaced: `set_backend(model, "torch")` puts it
    back). Its `state_dict` is the torch encoder's, so saving a model with a runtime encoder still saves every weight.
    Build it with `export_vision_encoder`; it is tied to the weights it was exported from (a later change to them is
    not seen: export again).
    """

    def __init__(
        self,
        backend: str,
        folder: Path,
        metadata: dict,
        torch_encoder: nn.Module | None,
        num_threads: int,
        precision: str | None = None,
        compiled_cache: bool = True,
    ):
        super().__init__()
        self.backend = backend
        self.folder = Path(folder)
        self.metadata = metadata
        self.precision = precision or metadata["precision"]
        self.compute_precision = "fp32"
        self.fingerprint = metadata["fingerprint"]
        self.num_threads = num_threads
        self.input_shape = tuple(metadata["input_shape"])
        self.output_shape = tuple(metadata["output_shape"])
        self.__dict__["torch_encoder"] = torch_encoder  # not a submodule: its weights are not this module's
        self._lock = threading.Lock()
        self._run = self._load(compiled_cache)

    def _load(self, compiled_cache: bool = True):
        path = self.folder / MODEL_FILES[self.backend]
        if self.backend == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.num_threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

            def run(array: np.ndarray) -> np.ndarray:
                return session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]

            self.__dict__["session"] = session
            return run
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": self.num_threads,
            "PERFORMANCE_HINT": "LATENCY",
            # Always set: for fp32, OpenVINO would pick bf16 by itself on CPUs with AMX / AVX512-BF16.
            # (f32 for what PRECISIONS does not offer, e.g. the int8 models benchmarks/runtime.py measures)
            "INFERENCE_PRECISION_HINT": _OPENVINO_HINTS.get(self.precision, "f32"),
        }
        # A read-only export folder is used without the compiled-model cache. One cache per precision: OpenVINO
        # 2026.4 crashes (segfault) compiling for bf16 from a cache that holds the same model's f32 blob.
        if compiled_cache and os.access(self.folder, os.W_OK):
            config["CACHE_DIR"] = str(self.folder / "cache" / self.precision)
        compiled = core.compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()
        output = compiled.output(0)
        # What the CPU plugin computes in: bf16 asked of a CPU without bf16 arithmetic runs in f32.
        self.compute_precision = _openvino_precision(compiled)

        def run(array: np.ndarray) -> np.ndarray:
            with self._lock:  # one infer request, not re-entrant
                return request.infer({0: array}, share_inputs=True, share_outputs=False)[output]

        self.__dict__["compiled_model"] = compiled
        return run

    @property
    def torch_encoder(self) -> nn.Module | None:
        return self.__dict__["torch_encoder"]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != self.input_shape:
            raise ValueError(
                f"The {self.backend} image encoder takes pixel_values of shape (batch_size, "
                f"{', '.join(map(str, self.input_shape))}), got {tuple(pixel_values.shape)}."
            )
        device, dtype = pixel_values.device, pixel_values.dtype
        if pixel_values.shape[0] == 0:
            return torch.zeros((0, *self.output_shape), device=device, dtype=dtype)
        array = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            embeddings = self._run(array)
        except Exception as error:
            raise RuntimeError(
                f"The {self.backend} image encoder (`{self.folder}`) failed on pixel_values of shape "
                f"{tuple(pixel_values.shape)}: {type(error).__name__}: {error}. Run the encoder in torch instead: "
                'backend="torch" (`imedsam_hf.runtime.set_backend(model, "torch")`).'
            ) from error
        return torch.from_numpy(np.ascontiguousarray(embeddings)).to(device=device, dtype=dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.torch_encoder is not None:
            self.torch_encoder.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, precision={self.precision!r}, compute_precision={self.compute_precision!r}, "
            f"threads={self.num_threads}, folder='{self.folder}'"
        )


def _openvino_precision(compiled) -> str:
    """The precision an OpenVINO compiled model computes in, as one of PRECISIONS' names where it is one."""
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except RuntimeError:
        return "fp32"
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(name, name)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points


def export_vision_encoder(
    model: nn.Module,
    backend: str = "openvino",
    folder: str | os.PathLike | None = None,
    *,
    precision: str = "fp32",
    num_threads: int | None = None,
    verify: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """
    Export the image encoder of `model` to `backend` (or reuse its cached export) and return the module that
    replaces `model.vision_encoder`: a `RuntimeVisionEncoder` (for `"torch"`, the torch encoder itself).

    Args:
        model: an `IMedSamModel` (or a PEFT model around one), in eval mode, trained or not; the encoder is
            exported as it is now, adapters included. The model is not changed (`set_backend` installs the result).
        backend: `"onnx"` (ONNX Runtime) or `"openvino"`; `"torch"` returns the torch encoder.
        folder: where the export lives. Default: `cache_dir / "<backend>-<precision>-<fingerprint[:16]>"`. A folder
            holding the export of another model, of other weights or settings, or a damaged one, is rebuilt; a
            non-empty folder that is not an export is refused.
        precision: `"fp32"`, or for OpenVINO `"bf16"` (see `PRECISIONS`): compiled for bf16 arithmetic, which a
            CPU with AMX / AVX512-BF16 has (elsewhere OpenVINO computes in fp32, and a warning says so).
        num_threads: the runtime's threads (default `torch.get_num_threads()`).
        verify: on a new export, compare it with torch on a probe image (batch of 2) and refuse it
            (`RuntimeError`) when it is off by more than `VERIFY_TOLERANCE` (a bf16 compilation: also by more than
            `REDUCED_PRECISION_TOLERANCE`).
        cache_dir: root of the default folders (default `default_cache_dir()`).

    Raises `ValueError` for an unknown backend or precision, `ImportError` naming the extra to install when the
    runtime is missing, `RuntimeError` when the export fails or does not match torch.
    """
    check_backend(backend, precision)
    encoder = torch_vision_encoder(model)
    if backend == "torch":
        return encoder
    _require(backend)
    fingerprint = encoder_fingerprint(model, backend, precision)
    folder = (
        Path(folder)
        if folder is not None
        else Path(cache_dir or default_cache_dir()) / (f"{backend}-{precision}-{fingerprint[:16]}")
    )
    threads = int(num_threads or torch.get_num_threads())
    if not cached_export_is_valid(folder, fingerprint):  # checked first without a lock: a read-only cache works
        with _building(folder):
            if not cached_export_is_valid(folder, fingerprint):
                _require(backend, exporting=True)
                _build(model, encoder, backend, precision, folder, fingerprint, verify, threads)
    runtime_encoder = RuntimeVisionEncoder(backend, folder, _read_metadata(folder), encoder, threads)
    if runtime_encoder.compute_precision != precision:
        warnings.warn(
            f"precision={precision!r}: this CPU has no {precision} arithmetic, so {backend} computes the image "
            f"encoder in {runtime_encoder.compute_precision} (same results as precision='fp32', no faster).",
            stacklevel=2,
        )
    return runtime_encoder


def _build(model, encoder, backend, precision, folder: Path, fingerprint, verify, threads) -> None:
    shape = _input_shape(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not _is_export_folder(folder):
        raise ValueError(f"`{folder}` exists and is not a runtime export folder: pick an empty or a new folder.")
    built = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=folder.parent))
    start = time.perf_counter()
    try:
        module, lora_merged = _export_copy(encoder)
        try:
            if backend == "onnx":
                _export_onnx(module, shape, built)
            else:
                _save_openvino(_export_openvino(module, shape, built), built)
        except Exception as error:
            raise RuntimeError(
                f"Exporting the image encoder to backend={backend!r} failed: {type(error).__name__}: "
                f'{str(error).strip()[:2000]}. Use backend="torch", or the other runtime.'
            ) from error
        files = file_records(built, (p for p in built.rglob("*") if p.is_file()))
        probe = probe_images(shape, 1)
        with torch.no_grad():
            reference = module(probe)
        metadata = {
            "format": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "backend": backend,
            "precision": precision,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "input_shape": list(shape),
            "output_shape": list(reference.shape[1:]),
            "lora_merged": lora_merged,
            "frequency_adapter": any(
                isinstance(m, frequency_adapter_layers.FrequencyTokenizer) for _, m in _adapter_layers(encoder)
            ),
            "versions": {"imedsam_hf": __version__, "torch": torch.__version__, backend: _runtime_version(backend)},
            "files": files,
            "export_seconds": round(time.perf_counter() - start, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if verify:
            # The graph in fp32 first (an export error is not hidden by a reduced precision's), then the precision
            # asked for. The probe twice, a batch of 2: checks the dynamic batch axis too.
            checks = [("fp32", VERIFY_TOLERANCE, "probe_error")]
            if precision != "fp32":
                checks.append((precision, REDUCED_PRECISION_TOLERANCE, f"probe_error_{precision}"))
            for checked, tolerance, key in checks:
                check = RuntimeVisionEncoder(
                    backend, built, metadata, None, threads, precision=checked, compiled_cache=False
                )
                outputs = check(torch.cat([probe, probe]))
                error = max(float((outputs[i : i + 1] - reference).abs().max()) for i in range(2))
                del check
                metadata[key] = error
                if not error <= tolerance:
                    raise RuntimeError(
                        f"The {backend} export of the image encoder ({checked}) does not match torch: max abs error "
                        f'{error:.3g} on the probe image (tolerance {tolerance}). Use backend="torch"'
                        + (' or precision="fp32".' if checked != "fp32" else ".")
                    )
        (built / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        _install(built, folder)
        logger.info("Exported the image encoder to %s (%s) in %.1f s", folder, backend, metadata["export_seconds"])
    finally:
        if built.exists():
            shutil.rmtree(built, ignore_errors=True)


def set_backend(model: nn.Module, backend: str = "openvino", **options: Any) -> nn.Module:
    """
    Run `model`'s image encoder on `backend`: `model.vision_encoder` (of the model inside a PEFT model) becomes
    `export_vision_encoder(model, backend, **options)`; `backend="torch"` puts the torch encoder back. With
    `precision="bf16"`, where the runtime computes in bf16, the decoders do too (`config.decoder_precision`); any
    other backend or precision sets it back to `"fp32"`. In place; returns `model`. `encode_image`, `forward` and everything built on them (`segment`, volumes, evaluation) then
    use the runtime.
    """
    check_backend(backend, options.get("precision", "fp32"))
    base = _base_model(model)
    encoder = export_vision_encoder(model, backend, **options)
    base.vision_encoder = encoder
    # bf16 where the runtime computes the encoder in it (this CPU has the arithmetic): the decoders too.
    bf16 = getattr(encoder, "compute_precision", "fp32") == "bf16"
    base.config.decoder_precision = "bf16" if bf16 else "fp32"
    return model


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
# Environment variables that choose the allocator or its settings: where one is set, the user's choice stands.
_ALLOCATOR_VARIABLES = (
    "LD_PRELOAD",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)


def keep_freed_memory(top_pad_mib: int = 512, trim_threshold_mib: int = 2047) -> str:
    """
    Tune glibc's `malloc` for CPU work (training, evaluation, prediction), in this process: large blocks come from
    the heap instead of a fresh `mmap` each (`M_MMAP_MAX` 0), and freed memory stays in the process until more than
    `trim_threshold_mib` of it is free at the top of the heap (`M_TRIM_THRESHOLD`), the heap growing `top_pad_mib`
    at a time (`M_TOP_PAD`). By default glibc serves every block above 32 MB with a new mapping and unmaps it on
    free, so the kernel zeroes gigabytes of fresh pages every training step and every slice of a volume (measured:
    docs/training.md, "Launching", and docs/cli.md). The same as the `MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_` /
    `MALLOC_TOP_PAD_` variables, without setting them before the process starts.

    Returns what was done, or why nothing was: not glibc (macOS, Windows, musl), or an allocator variable
    (`LD_PRELOAD` of another malloc, `MALLOC_*_`, `GLIBC_TUNABLES`) set by the user, whose choice stands.
    """
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return f"allocator left as it is: not glibc ({sys.platform})"
    # LD_PRELOAD counts where it loads another malloc (jemalloc, tcmalloc, mimalloc), not for any other library.
    chosen = [
        name
        for name in _ALLOCATOR_VARIABLES
        if os.environ.get(name) and (name != "LD_PRELOAD" or "malloc" in os.environ[name])
    ]
    if chosen:
        return f"allocator left as it is: {', '.join(chosen)} set"
    libc = ctypes.CDLL(None)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_threshold_mib << 20), (_M_TOP_PAD, top_pad_mib << 20))
    if not all(libc.mallopt(parameter, value) == 1 for parameter, value in settings):
        return "allocator left as it is: glibc refused mallopt"
    return f"glibc malloc keeps freed memory (no mmap per large block, trim above {trim_threshold_mib} MiB free)"


def tune_cpu_allocator(choice: str, device: str | torch.device | None) -> str | None:
    """`--cpu-allocator keep|default` of the scripts and commands: :func:`keep_freed_memory` where `device` is the
    CPU and `choice` is "keep" (its message); None where nothing was asked (another device, "default", no device)."""
    if choice != "keep" or device is None or torch.device(device).type != "cpu":
        return None
    return keep_freed_memory()


__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "RuntimeVisionEncoder",
    "backend_available",
    "cached_export_is_valid",
    "check_backend",
    "require_backend",
    "default_cache_dir",
    "encoder_fingerprint",
    "model_folder_export",
    "export_vision_encoder",
    "keep_freed_memory",
    "tune_cpu_allocator",
    "probe_images",
    "set_backend",
    "torch_vision_encoder",
    "traceable_image_spectrum",
]
