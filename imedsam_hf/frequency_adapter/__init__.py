"""The frequency-adapter PEFT type (peft_type `"FREQ_ADAPTER"`), laid out like peft's own tuners: `config.py`,
`model.py`, and the layers in the flat `imedsam_hf.frequency_adapter_layers` (shipped with checkpoints)."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from ..frequency_adapter_layers import (
    ADAPTER_PREFIX,
    FrequencyDownsample,
    FrequencyFusionLayer,
    FrequencyTokenizer,
    QVLoRALinear,
    image_spectrum,
)
from .config import SAVED_PEFT_TYPE, FrequencyAdapterConfig, IMedSamPeftType, imedsam_peft_config
from .model import FrequencyAdapterModel


def register() -> None:
    """Make peft know the type: what `peft.utils.register_peft_method` does, for a type peft does not list."""
    for peft_type in (IMedSamPeftType.FREQ_ADAPTER, SAVED_PEFT_TYPE):
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = FrequencyAdapterConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = FrequencyAdapterModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = ADAPTER_PREFIX


register()

__all__ = [
    "FrequencyAdapterConfig",
    "FrequencyAdapterModel",
    "FrequencyDownsample",
    "FrequencyFusionLayer",
    "FrequencyTokenizer",
    "IMedSamPeftType",
    "QVLoRALinear",
    "image_spectrum",
    "imedsam_peft_config",
]
