"""imedsam_hf: I-MedSAM (ECCV 2024) as a transformers + PEFT model.

Importing the package registers `IMedSamConfig`/`IMedSamModel` with transformers' Auto classes and the
`FREQ_ADAPTER` PEFT type with peft.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_imedsam import IMedSamConfig
from .frequency_adapter import FrequencyAdapterConfig, FrequencyAdapterModel, imedsam_peft_config
from .inference import Segmentation, segment
from .modeling_imedsam import IMedSamImplicitDecoder, IMedSamModel, IMedSamOutput
from .processing_imedsam import IMedSamProcessor, processor_for_config
from .publishing import export_full_model, save_pretrained_full

__version__ = "0.1.0"

AutoConfig.register(IMedSamConfig.model_type, IMedSamConfig, exist_ok=True)
AutoModel.register(IMedSamConfig, IMedSamModel, exist_ok=True)
AutoImageProcessor.register(IMedSamConfig, image_processor_classes={"pil": IMedSamProcessor}, exist_ok=True)

__all__ = [
    "FrequencyAdapterConfig",
    "FrequencyAdapterModel",
    "IMedSamConfig",
    "IMedSamImplicitDecoder",
    "IMedSamModel",
    "IMedSamOutput",
    "IMedSamProcessor",
    "export_full_model",
    "imedsam_peft_config",
    "processor_for_config",
    "save_pretrained_full",
    "Segmentation",
    "segment",
]
