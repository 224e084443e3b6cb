"""imedsam_hf: I-MedSAM (ECCV 2024) as a transformers + PEFT model.

Importing the package registers `IMedSamConfig`/`IMedSamModel`/`IMedSamProcessor` with transformers' Auto classes
and the `FREQ_ADAPTER` PEFT type with peft.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_imedsam import FrequencyAdapterSettings, IMedSamConfig, IMedSamTinyViTConfig
from .frequency_adapter import FrequencyAdapterConfig, FrequencyAdapterModel, imedsam_peft_config
from .inference import Segmentation, overlay, segment
from .loading import load_model
from .modeling_imedsam import IMedSamImplicitDecoder, IMedSamModel, IMedSamOutput
from .processing_imedsam import IMedSamProcessor, processor_for_config
from .publishing import export_full_model, save_pretrained_full
from .version import __version__

AutoConfig.register(IMedSamConfig.model_type, IMedSamConfig, exist_ok=True)
AutoModel.register(IMedSamConfig, IMedSamModel, exist_ok=True)
try:
    AutoImageProcessor.register(IMedSamConfig, image_processor_classes={"pil": IMedSamProcessor}, exist_ok=True)
except ImportError:  # transformers < 5.2x without torchvision: its AutoImageProcessor is unusable, ours still works
    pass

__all__ = [
    "FrequencyAdapterConfig",
    "FrequencyAdapterModel",
    "FrequencyAdapterSettings",
    "IMedSamConfig",
    "IMedSamImplicitDecoder",
    "IMedSamModel",
    "IMedSamOutput",
    "IMedSamProcessor",
    "IMedSamTinyViTConfig",
    "Segmentation",
    "__version__",
    "export_full_model",
    "imedsam_peft_config",
    "load_model",
    "overlay",
    "processor_for_config",
    "save_pretrained_full",
    "segment",
]
