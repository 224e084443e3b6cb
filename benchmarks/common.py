"""Shared helpers of the benchmark scripts: models, device, synchronised timing, peak memory, tables."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import SamConfig

import imedsam_hf  # noqa: F401
from imedsam_hf import IMedSamConfig, IMedSamModel, imedsam_peft_config
from imedsam_hf.loading import LITEMEDSAM, load_model
from imedsam_hf.volumes import VOLUME_PROTOCOLS, volume_prompts  # noqa: F401  (the benchmarks' protocols)

BACKBONES = ("vit-b-384", "vit-b-1024", LITEMEDSAM)


def backend_variant(variant: str) -> tuple[str, dict]:
    """`--backend BACKEND[:PRECISION]` (`openvino:bf16`) -> `load_model`'s `backend` and `backend_options`."""
    backend, _, precision = variant.partition(":")
    return backend, ({"precision": precision} if precision else {})


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_run_arguments(parser) -> None:
    """The options every benchmark shares: repeats, device, threads, mixed precision, JSON output."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--mixed_precision", default="no", choices=list(AUTOCAST_DTYPES))
    parser.add_argument("--json", default=None)


def setup_run(args) -> tuple[torch.device, torch.dtype | None]:
    """Apply `--num_threads`; return the device and the autocast dtype (None: no autocast)."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    return pick_device(args.device), AUTOCAST_DTYPES[args.mixed_precision]


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def build_model(backbone: str, **config_overrides) -> IMedSamModel:
    """I-MedSAM on a backbone: random ViT-B at 384/1024 px (timing only) or the real LiteMedSAM."""
    if backbone == LITEMEDSAM:
        return load_model(LITEMEDSAM, config_overrides=config_overrides, eval_mode=False)[0]
    size = int(backbone.rsplit("-", 1)[-1])
    torch.manual_seed(0)
    return IMedSamModel(IMedSamConfig.from_sam_config(SamConfig(), image_size=size, **config_overrides))


def adapted(model: IMedSamModel, **recipe_overrides):
    """The I-MedSAM PEFT recipe on `model` (the LoRA-only variant with use_frequency_adapter=False)."""
    return get_peft_model(model, imedsam_peft_config(model.config, **recipe_overrides))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function, device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median and min wall time of `function()` in seconds, synchronised on CUDA."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_cpu_peak() -> bool:
    """Return freed heap to the OS (glibc `malloc_trim`) and reset the kernel's peak RSS (VmHWM); False if not
    possible (not Linux, or /proc/self/clear_refs not writable)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except (OSError, AttributeError):
        return False


@contextmanager
def peak_memory(device: torch.device):
    """
    Peak memory above the starting level while the block runs, in MiB. CUDA: the allocator's peak. CPU: the
    kernel's exact peak resident set (VmHWM, reset at the start, after glibc has returned cached free memory), so
    neither allocator caching between rows nor a sampling interval distorts it; sampled RSS where that is
    unavailable.
    """
    result = {"peak_mib": float("nan")}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    if _reset_cpu_peak():
        start = _status_kib("VmRSS")
        yield result
        result["peak_mib"] = (_status_kib("VmHWM") - start) / 1024
        return
    start, peak, running = _status_kib("VmRSS"), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _status_kib("VmRSS"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        running[0] = False
        thread.join()
        peak[0] = max(peak[0], _status_kib("VmRSS"))
        result["peak_mib"] = (peak[0] - start) / 1024


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))


def report(result: dict, header: str, columns: list[str], json_path: str | None) -> dict:
    """The end of every benchmark: a header line, the table of `result["rows"]`, the JSON file when asked."""
    print(header)
    print_table(result["rows"], columns)
    if json_path:
        write_json(json_path, result)
    return result


def add_paired_arguments(parser) -> None:
    """The arguments of a paired comparison of one trained model on a split: model, data, split, box jitters, threads
    and the JSON file."""
    parser.add_argument("--model", required=True, help="a trained model (shipped name or folder)")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--jitter", nargs="+", type=float, default=[0.0, 0.1], help="box jitter(s); 0: exact boxes")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--json", default=None)


def model_and_split(spec: str, data_dir: str, split: str, num_threads: int | None = None):
    """A trained model (shipped name or folder), its processor and the image/mask pairs of `split` by its own
    `splits.json` (`"all"`: every pair of `data_dir`); masks are checked as class ids where `data_dir` has a
    `classes.json`, else as binary."""
    from imedsam_hf.data import discover_pairs, read_class_names, select_split, validate_pairs
    from imedsam_hf.shipped import is_shipped, shipped_folder

    if num_threads:
        torch.set_num_threads(num_threads)
    model, processor = load_model(spec)
    folder = shipped_folder(spec) if is_shipped(spec) else Path(spec)
    found, problems = discover_pairs(data_dir)
    names = read_class_names(data_dir)
    pairs, _ = validate_pairs(found, num_classes=max(names) if names else 1, problems=problems)
    return model, processor, select_split(pairs, split, folder / "splits.json")


def progress(iterable, description: str, total: int | None = None):
    """A progress bar on stderr (the table on stdout stays clean)."""
    return tqdm(iterable, desc=description, total=total, leave=False)
