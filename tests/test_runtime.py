"""The image encoder on ONNX Runtime / OpenVINO (`imedsam_hf.runtime`): parity with torch (LiteMedSAM on real
images, a trained-style I-MedSAM with LoRA and the frequency adapter active), the fingerprinted cache, the errors.

Each runtime is an optional extra: its tests skip when it is not installed. The fast tests use a tiny TinyViT
I-MedSAM (64 px) on OpenVINO (its export takes a few seconds); the ONNX export has a fixed cost of 10+ s
(`torch.export`), so the tiny ONNX tests are marked slow, like the LiteMedSAM ones (~30 s an export on 2 cores).
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA, randomize_adapters, run_python, tiny_tinyvit_model
from peft import get_peft_model
from PIL import Image

import imedsam_hf
from imedsam_hf import imedsam_peft_config, runtime

POLYP = SHARED_DATA / "EndoTect2020-polyp"
RUNTIME_MODULES = {"onnx": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino",)}


def tiny_adapted_model(seed: int = 0, **recipe):
    """A trained-style tiny I-MedSAM: LoRA and the frequency adapter (gated fusion) moved off their init."""
    model = tiny_tinyvit_model(seed)
    peft_model = get_peft_model(model, imedsam_peft_config(model.config, fusion_gate=True, **recipe))
    randomize_adapters(peft_model)
    return peft_model.eval()


def require(backend: str) -> None:
    """Skip unless `backend`'s packages import (absent, or present but broken: both an ImportError)."""
    for module in RUNTIME_MODULES[backend]:
        pytest.importorskip(module, exc_type=ImportError)


@pytest.fixture(autouse=True)
def one_thread_and_private_cache(tmp_path, monkeypatch):
    """One torch thread (a training may share the machine), and never the user's cache folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("IMEDSAM_RUNTIME_CACHE", str(tmp_path / "default-cache"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["onnx", "openvino"])
def backend(request):
    require(request.param)
    return request.param


def outputs(model, pixel_values, boxes):
    with torch.no_grad():
        return model(pixel_values=pixel_values, input_boxes=boxes)


def assert_parity(actual, expected, atol=1e-3):
    for field in ("image_embeddings", "sam_logits", "logits"):
        error = (getattr(actual, field) - getattr(expected, field)).abs().max().item()
        assert error <= atol, f"{field}: max abs error {error:.3g} > {atol}"


@pytest.fixture(scope="module", params=["openvino", pytest.param("onnx", marks=pytest.mark.slow)])
def tiny_export(request, tmp_path_factory):
    """A tiny adapted model exported once per backend: (backend, model, inputs, torch outputs, folder)."""
    require(request.param)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_adapted_model()
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.rand(3, 3, 64, 64, generator=generator)
        boxes = torch.tensor([[10.0, 12.0, 40.0, 50.0], [5.0, 5.0, 60.0, 30.0], [20.0, 20.0, 44.0, 44.0]])
        expected = outputs(model, pixel_values, boxes)
        folder = tmp_path_factory.mktemp("runtime") / request.param
        encoder = runtime.export_vision_encoder(model, request.param, folder, num_threads=1)
    finally:
        torch.set_num_threads(threads)
    return request.param, model, (pixel_values, boxes), expected, encoder


# ----------------------------------------------------------------------------------------------------------------------
# Without a runtime


def test_unknown_backend_or_precision_is_a_value_error():
    model = tiny_tinyvit_model()
    with pytest.raises(ValueError, match="'torch', 'onnx', 'openvino'"):
        runtime.export_vision_encoder(model, "tensorrt")
    with pytest.raises(ValueError, match="precision='fp16' is not offered"):
        runtime.set_backend(model, "openvino", precision="fp16")
    for backend in ("torch", "onnx"):  # bf16 is OpenVINO's (its CPU plugin's bf16 arithmetic) only
        with pytest.raises(ValueError, match=f"precision='bf16' is not offered for backend='{backend}'"):
            runtime.require_backend(backend, "bf16")
    with pytest.raises(ValueError, match="precision='bf16' is not offered for backend='torch'"):
        imedsam_hf.load_model("litemedsam", backend_options={"precision": "bf16"})
    assert runtime.export_vision_encoder(model, "torch") is model.vision_encoder


@pytest.mark.parametrize("backend, module", [("onnx", "onnxruntime"), ("openvino", "openvino"), ("onnx", "onnxscript")])
def test_a_missing_runtime_names_the_extra_to_install(backend, module, monkeypatch):
    if module == "onnxscript":  # the exporter alone missing: the runtime must be there
        pytest.importorskip("onnxruntime", exc_type=ImportError)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError) as raised:
        runtime.set_backend(tiny_tinyvit_model(), backend)
    message = str(raised.value)
    assert f"[{backend}] extra" in message and f"pip install {module}" in message and 'backend="torch"' in message
    assert not runtime.backend_available(backend)


def test_the_fingerprint_covers_weights_buffers_settings_and_backend():
    model = tiny_adapted_model()
    fingerprint = runtime.encoder_fingerprint(model, "torch")
    assert runtime.encoder_fingerprint(tiny_adapted_model(), "torch") == fingerprint  # same weights, same key
    assert runtime.encoder_fingerprint(model.get_base_model(), "torch") == fingerprint  # PEFT or not
    encoder = model.get_base_model().vision_encoder
    lora = next(p for n, p in encoder.named_parameters() if "freq_lora_v_B" in n)
    adapter = next(p for n, p in encoder.named_parameters() if "freq_adapter" in n)
    batchnorm = next(m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    fusion = next(m for m in encoder.modules() if type(m).__name__ == "FrequencyFusionLayer")
    changes = [
        lambda: lora.data.add_(1e-3),  # a LoRA weight
        lambda: adapter.data.add_(1e-3),  # a frequency-adapter weight
        lambda: batchnorm.running_var.mul_(1.01),  # a buffer
        lambda: fusion.fusion_scale.update(default=0.25),  # a setting that is no tensor
    ]
    seen = {fingerprint}
    for change in changes:
        change()
        seen.add(runtime.encoder_fingerprint(model, "torch"))
    seen.add(runtime.encoder_fingerprint(model, "torch", precision="int8"))
    with model.disable_adapter():
        seen.add(runtime.encoder_fingerprint(model, "torch"))
    assert len(seen) == len(changes) + 3


def test_the_traceable_spectrum_is_the_adapters_spectrum():
    from imedsam_hf.frequency_adapter_layers import image_spectrum

    pixel_values = torch.rand(2, 3, 32, 48)
    for mode in ("amplitude", "phase"):
        for log_scale in (True, False):
            expected = image_spectrum(pixel_values, mode, log_scale)
            torch.testing.assert_close(runtime.traceable_image_spectrum(pixel_values, mode, log_scale), expected)


def test_a_folder_that_is_no_export_is_never_overwritten(tmp_path):
    require("openvino")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a runtime export folder"):
        runtime.export_vision_encoder(tiny_tinyvit_model(), "openvino", folder)
    assert (folder / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------------
# Tiny model on each runtime


def test_tiny_adapted_model_matches_torch_with_any_batch_size(tiny_export):
    backend, model, (pixel_values, boxes), expected, encoder = tiny_export
    assert isinstance(encoder, runtime.RuntimeVisionEncoder) and encoder.backend == backend
    assert encoder.metadata["lora_merged"] and encoder.metadata["frequency_adapter"]
    assert encoder.metadata["probe_error"] < 1e-4
    base = model.get_base_model()
    original = base.vision_encoder
    try:
        base.vision_encoder = encoder
        assert_parity(outputs(model, pixel_values, boxes), expected, atol=1e-4)  # batch 3
        single = outputs(model, pixel_values[1:2], boxes[1:2])
        torch.testing.assert_close(single.sam_logits, expected.sam_logits[1:2], atol=1e-4, rtol=0)
        empty = encoder(torch.zeros(0, 3, 64, 64))
        assert empty.shape == (0, *expected.image_embeddings.shape[1:])
        # The input's dtype (and device) come back.
        assert encoder(pixel_values[:1].double()).dtype == torch.float64
    finally:
        base.vision_encoder = original


def test_set_backend_installs_the_runtime_encoder_and_torch_restores_it(tiny_export, monkeypatch):
    backend, model, (pixel_values, boxes), expected, encoder = tiny_export
    base = model.get_base_model()
    original = base.vision_encoder
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(runtime, "_build", lambda *a, **k: pytest.fail("the cached export must be reused"))
    runtime.set_backend(model, backend, folder=encoder.folder)
    try:
        assert isinstance(base.vision_encoder, runtime.RuntimeVisionEncoder)
        assert base.vision_encoder.torch_encoder is original
        # Saving the model still saves every encoder weight, under the same names.
        saved = model.state_dict()
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
        assert_parity(outputs(model, pixel_values, boxes), expected, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(model.get_base_model().encode_image(pixel_values), expected.image_embeddings)
    finally:
        runtime.set_backend(model, "torch")
    assert base.vision_encoder is original


def test_a_second_load_reuses_the_cached_export(tiny_export, monkeypatch):
    backend, model, _, _, encoder = tiny_export
    metadata = json.loads((encoder.folder / "runtime.json").read_text())
    monkeypatch.setattr(runtime, "_build", lambda *a, **k: pytest.fail("the cached export must be reused"))
    again = runtime.export_vision_encoder(model, backend, encoder.folder)
    assert again.fingerprint == encoder.fingerprint == metadata["fingerprint"]
    assert json.loads((encoder.folder / "runtime.json").read_text())["created"] == metadata["created"]
    if backend == "openvino":
        assert any((encoder.folder / "cache" / "fp32").iterdir())  # OpenVINO's compiled-model cache


def test_openvino_bf16_is_its_own_export_and_compiled_cache(tmp_path):
    """precision="bf16": a folder (fingerprint) and compiled-model cache of its own, beside the fp32 one: OpenVINO
    2026.4 crashed (segfault) compiling for bf16 from a cache holding the same model's f32 blob. Embeddings within
    the reduced-precision tolerance; on a CPU without bf16 arithmetic it computes in fp32 and warns."""
    require("openvino")
    import openvino as ov

    model = tiny_adapted_model(seed=2)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = runtime.torch_vision_encoder(model)(pixel_values)
    fp32 = runtime.export_vision_encoder(model, "openvino", cache_dir=tmp_path, num_threads=1)
    fp32(pixel_values)
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16 = runtime.export_vision_encoder(model, "openvino", cache_dir=tmp_path, precision="bf16", num_threads=1)
    assert bf16.folder != fp32.folder and bf16.fingerprint != fp32.fingerprint
    assert bf16.precision == "bf16" and bf16.metadata["precision"] == "bf16"
    assert bf16.compute_precision == ("bf16" if has_bf16 else "fp32") and fp32.compute_precision == "fp32"
    assert any("no bf16 arithmetic" in str(w.message) for w in caught) != has_bf16
    assert bf16.metadata["probe_error"] <= runtime.VERIFY_TOLERANCE  # the graph, checked in fp32 first
    assert bf16.metadata["probe_error_bf16"] <= runtime.REDUCED_PRECISION_TOLERANCE
    error = float((bf16(pixel_values) - expected).abs().max())
    assert error <= runtime.REDUCED_PRECISION_TOLERANCE
    assert (bf16.folder / "cache" / "bf16").is_dir() and (fp32.folder / "cache" / "fp32").is_dir()
    again = runtime.export_vision_encoder(model, "openvino", cache_dir=tmp_path, precision="bf16", num_threads=1)
    assert again.folder == bf16.folder and float((again(pixel_values) - bf16(pixel_values)).abs().max()) == 0
    # The decoders follow the encoder's arithmetic: bf16 where the runtime computes in it, fp32 again after.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runtime.set_backend(model, "openvino", cache_dir=tmp_path, precision="bf16", num_threads=1)
    assert model.config.decoder_precision == ("bf16" if has_bf16 else "fp32")
    runtime.set_backend(model, "openvino", cache_dir=tmp_path, num_threads=1)
    assert model.config.decoder_precision == "fp32"


def test_a_runtime_failure_names_the_backend_and_suggests_torch(tiny_export, monkeypatch):
    backend, _, (pixel_values, _), _, encoder = tiny_export

    def failing(array):
        raise MemoryError("simulated")

    monkeypatch.setattr(encoder, "_run", failing)
    with pytest.raises(RuntimeError, match=rf"The {backend} image encoder .* backend=\"torch\""):
        encoder(pixel_values)
    with pytest.raises(ValueError, match="pixel_values of shape"):
        encoder(torch.zeros(1, 3, 32, 32))


class Rebuilt(Exception):
    pass


def refuse_to_build(*args, **kwargs):
    raise Rebuilt


def test_changed_weights_or_a_damaged_file_are_detected_and_rebuilt(tiny_export, tmp_path, monkeypatch):
    backend, _, _, _, encoder = tiny_export
    folder = tmp_path / "export"
    shutil.copytree(encoder.folder, folder)
    model = tiny_adapted_model()  # the fixture's weights: its export is valid here
    fingerprint = runtime.encoder_fingerprint(model, backend)
    assert fingerprint == encoder.fingerprint and runtime.cached_export_is_valid(folder, fingerprint)
    monkeypatch.setattr(runtime, "_build", refuse_to_build)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "freq_lora_q_B" in n).add_(0.05)
    assert not runtime.cached_export_is_valid(folder, runtime.encoder_fingerprint(model, backend))
    with pytest.raises(Rebuilt):
        runtime.export_vision_encoder(model, backend, folder)
    # Another model's export in that folder: rebuilt too.
    with pytest.raises(Rebuilt):
        runtime.export_vision_encoder(tiny_tinyvit_model(), backend, folder)
    # A damaged file no longer matches its recorded checksum: rebuilt, not loaded.
    model_file = folder / runtime.MODEL_FILES[backend].replace(".xml", ".bin")
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    assert not runtime.cached_export_is_valid(folder, fingerprint)
    with pytest.raises(Rebuilt):
        runtime.export_vision_encoder(tiny_adapted_model(), backend, folder)


@pytest.mark.slow
def test_an_export_rebuilt_for_new_weights_computes_with_them(tiny_export, tmp_path):
    backend, _, (pixel_values, boxes), _, encoder = tiny_export
    folder = tmp_path / "export"
    shutil.copytree(encoder.folder, folder)
    model = tiny_adapted_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "freq_lora_q_B" in n).add_(0.05)
    expected = outputs(model, pixel_values, boxes)
    rebuilt = runtime.export_vision_encoder(model, backend, folder, num_threads=1)
    assert rebuilt.fingerprint != encoder.fingerprint
    assert json.loads((folder / "runtime.json").read_text())["fingerprint"] == rebuilt.fingerprint
    runtime.set_backend(model, backend, folder=folder)
    assert_parity(outputs(model, pixel_values, boxes), expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# LiteMedSAM on real images


def polyp_inputs(processor, count: int = 2):
    names = sorted(p.stem for p in (POLYP / "images").glob("*.jpg"))[:count]
    images, boxes = [], []
    for name in names:
        images.append(Image.open(POLYP / "images" / f"{name}.jpg").convert("RGB"))
        ys, xs = np.nonzero(np.asarray(Image.open(POLYP / "masks" / f"{name}.png").convert("L")) > 127)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    inputs = processor(images=images, input_boxes=boxes)
    return inputs["pixel_values"], inputs["input_boxes"]


@pytest.mark.slow
@pytest.mark.skipif(not (POLYP / "images").is_dir(), reason="shared data missing")
def test_litemedsam_on_the_runtime_gives_torchs_masks_on_real_images(backend, tmp_path, monkeypatch):
    model, processor = imedsam_hf.load_model("litemedsam")
    pixel_values, boxes = polyp_inputs(processor)
    expected = outputs(model, pixel_values, boxes)
    runtime.set_backend(model, backend, cache_dir=tmp_path)
    assert_parity(outputs(model, pixel_values, boxes), expected)
    assert model.vision_encoder.metadata["frequency_adapter"] is False
    # A second load (a new process would do the same) reuses the files.
    monkeypatch.setattr(runtime, "_build", lambda *a, **k: pytest.fail("the cached export must be reused"))
    again = runtime.export_vision_encoder(model, backend, cache_dir=tmp_path)
    assert again.folder == model.vision_encoder.folder


@pytest.mark.slow
@pytest.mark.skipif(not (POLYP / "images").is_dir(), reason="shared data missing")
def test_trained_litemedsam_with_lora_and_frequency_adapter_matches_torch(backend, tmp_path):
    model, processor = imedsam_hf.load_model(
        "litemedsam", eval_mode=False, config_overrides={"use_implicit_decoder": True, "frequency_fusion_gate": True}
    )
    model = get_peft_model(model, imedsam_peft_config(model.config))
    randomize_adapters(model)
    model.eval()
    pixel_values, boxes = polyp_inputs(processor)
    expected = outputs(model, pixel_values, boxes)
    with model.disable_adapter():  # the adapters are active: they change the masks
        assert (outputs(model, pixel_values, boxes).sam_logits - expected.sam_logits).abs().max() > 1e-2
    runtime.set_backend(model, backend, cache_dir=tmp_path)
    encoder = model.get_base_model().vision_encoder
    assert encoder.metadata["lora_merged"] and encoder.metadata["frequency_adapter"]
    assert_parity(outputs(model, pixel_values, boxes), expected)


@pytest.mark.slow
def test_load_model_and_the_commands_take_a_backend(tmp_path, monkeypatch, capsys):
    """`load_model(spec, backend=...)` and `imedsam predict/evaluate --backend`: the runtime encoder in place, the same
    masks as torch; a backend that is not installed is named with its extra before any model loads."""
    pytest.importorskip("openvino", exc_type=ImportError)
    from conftest import tiny_model

    from imedsam_hf import IMedSamProcessor, load_model
    from imedsam_hf.cli import main as cli_main
    from imedsam_hf.runtime import RuntimeVisionEncoder

    monkeypatch.setenv("IMEDSAM_RUNTIME_CACHE", str(tmp_path / "cache"))
    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "m")
    IMedSamProcessor(image_size=64).save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", backend="openvino")
    assert isinstance(model.vision_encoder, RuntimeVisionEncoder)
    images = sorted((SHARED_DATA / "Kvasir-SEG-sample" / "images").iterdir())[:1]
    argv = ["predict", "--model", str(tmp_path / "m"), str(images[0]), "--box", "50,50,300,300"]
    assert cli_main([*argv, "--out", str(tmp_path / "torch")]) == 0
    assert cli_main([*argv, "--backend", "openvino", "--out", str(tmp_path / "ov")]) == 0
    from PIL import Image

    torch_mask = np.asarray(Image.open(tmp_path / "torch" / f"{images[0].stem}.png"))
    ov_mask = np.asarray(Image.open(tmp_path / "ov" / f"{images[0].stem}.png"))
    assert (torch_mask == ov_mask).mean() > 0.999
    assert cli_main([*argv, "--backend", "openvino", "--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    bf16_mask = np.asarray(Image.open(tmp_path / "bf16" / f"{images[0].stem}.png"))
    # bf16 decoding too: this random tiny model's logits are ~1e-3, inside bf16's rounding of 0, so only the mask's
    # grid is compared (what bf16 moves on real models: docs/results.md, One CT volume end to end).
    assert bf16_mask.shape == torch_mask.shape
    assert cli_main([*argv, "--precision", "bf16", "--out", str(tmp_path / "y")]) == 2  # torch: fp32 only
    assert "precision='bf16' is not offered for backend='torch'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_mode"):
        load_model(tmp_path / "m", backend="openvino", eval_mode=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: `import onnxruntime` raises ImportError
    assert cli_main([*argv, "--backend", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "[onnx] extra" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_writes_the_runtime_files_beside_the_model_and_load_model_uses_them(tmp_path, monkeypatch, capsys):
    """`imedsam export --backend openvino`: the Hub folder plus `runtime/openvino-<precision>/` (the encoder's files and
    a compiled-model cache); `load_model(folder, backend="openvino")` and `imedsam predict` use them, exporting
    nothing; the same masks as torch."""
    require("openvino")
    from conftest import tiny_model

    from imedsam_hf import IMedSamProcessor
    from imedsam_hf.cli import main as cli_main

    tiny_model(implicit_decoder_trained=True).save_pretrained(tmp_path / "m")
    IMedSamProcessor(image_size=64).save_pretrained(tmp_path / "m")
    out = tmp_path / "hub"
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--output", str(out), "--backend", "openvino"]) == 0
    assert "runtime/openvino-fp32" in capsys.readouterr().out
    beside = runtime.model_folder_export(out, "openvino")
    assert (beside / "openvino_model.xml").is_file() and any((beside / "cache" / "fp32").iterdir())
    monkeypatch.setattr(runtime, "_build", lambda *a, **k: pytest.fail("the folder's own export must be used"))
    model, _ = imedsam_hf.load_model(out, backend="openvino")
    assert model.vision_encoder.folder == beside
    reference, _ = imedsam_hf.load_model(out)
    pixel_values = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[8.0, 8.0, 40.0, 50.0]])
    assert_parity(outputs(model, pixel_values, boxes), outputs(reference, pixel_values, boxes))
    # A bad --precision is refused before anything is written.
    assert (
        cli_main(["export", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "x"), "--precision", "bf16"])
        == 2
    )
    assert "precision='bf16' is not offered for backend='torch'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


ALLOCATOR_PROBE = """
import ctypes, os, sys
from imedsam_hf.runtime import keep_freed_memory
if sys.argv[-1] == "keep":
    print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
size = 256 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
before = resident()
libc.free(ctypes.c_void_p(block))
print((before - resident()) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("mode", ["keep", "default"])
@pytest.mark.parametrize("user_variable", [None, "MALLOC_TOP_PAD_"])
def test_cpu_allocator_keeps_freed_memory_unless_the_user_chose(tmp_path, mode, user_variable):
    """glibc unmaps a freed 256 MB block at once; tuned, the process keeps it (no fresh pages to zero next step).
    An allocator variable set by the user wins: nothing is changed and the reason is said."""
    env = {"MALLOC_TOP_PAD_": str(1 << 20)} if user_variable else {}
    code = ALLOCATOR_PROBE.replace("sys.argv[-1]", repr(mode))
    lines = run_python(code, REPO_ROOT, env_extra=env).split()
    released = int(lines[-1])
    if mode == "keep" and not user_variable:
        assert "keeps freed memory" in " ".join(lines) and released < 16
    else:
        assert released > 200
        assert mode == "default" or "MALLOC_TOP_PAD_ set" in " ".join(lines)


def test_tune_cpu_allocator_only_on_the_cpu_and_when_asked(allocator_calls):
    """`--cpu-allocator`'s one rule for train.py, the CLI, the demo and training/propagated_boxes.py: the tuning
    runs for "keep" on a CPU device, never for "default", another device or none."""
    from imedsam_hf.runtime import tune_cpu_allocator

    assert tune_cpu_allocator("default", "cpu") is None and tune_cpu_allocator("keep", "cuda:0") is None
    assert tune_cpu_allocator("keep", None) is None and allocator_calls == []
    assert tune_cpu_allocator("keep", torch.device("cpu")) == "allocator (test): kept" and allocator_calls == [1]
