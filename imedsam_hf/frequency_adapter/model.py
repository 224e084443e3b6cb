"""`FrequencyAdapterModel`: the PEFT tuner that places the frequency-adapter layers."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..frequency_adapter_layers import ADAPTER_PREFIX, FrequencyAdapterLayer, FrequencyAdapterPlacer


class FrequencyAdapterModel(BaseTuner):
    """
    Adds LoRA on q/v and the frequency-adapter chain to an `IMedSamModel` (or any SAM-style encoder whose module
    names match the config's role patterns).

    `unload()` gives back the base model exactly as it was passed in: adapter layers removed and the original
    modules restored in place of the trained `modules_to_save` copies. To keep what was trained, save the adapter
    (`save_pretrained`) or the full model (`imedsam_hf.save_pretrained_full`). The frequency branch cannot be
    merged into the base weights, so `merge_and_unload()` raises.
    """

    prefix: str = ADAPTER_PREFIX
    tuner_layer_cls = FrequencyAdapterLayer
    target_module_mapping: dict = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # One placer per adapter: it owns the adapter's frequency stream and counts stream positions while
        # BaseTuner visits the targets in module order.
        self._placer = FrequencyAdapterPlacer(model, self.peft_config[adapter_name], adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            del self._placer

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        new_module = self._placer.wrap(current_key, target)
        if new_module is None:
            return
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child):
        # The wrapped modules may hold no weight of their own (a patch embedding's conv sits one level down);
        # move the new adapter tensors to the device of any base parameter.
        setattr(parent, child_name, new_module)
        base = child.get_base_layer() if isinstance(child, FrequencyAdapterLayer) else child
        reference = next(base.parameters(), None)
        if reference is not None:
            for name, module in new_module.named_modules():
                if self.prefix in name:
                    module.to(reference.device)

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        if not any(self.peft_config[name].use_frequency_adapter for name in self.active_adapters):
            return  # LoRA alone merges like peft's LoRA
        raise ValueError(
            "The frequency adapter is a separate branch and cannot be merged into the base weights. Save the full "
            "model with `imedsam_hf.save_pretrained_full(peft_model, path)`, or call `unload()` for the base model."
        )

    def unload(self) -> nn.Module:
        """Remove every adapter layer and restore the original `modules_to_save` modules; return the base model."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, (FrequencyAdapterLayer, ModulesToSaveWrapper)):
                parent_name, _, child_name = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                original = (
                    module.get_base_layer() if isinstance(module, FrequencyAdapterLayer) else module.original_module
                )
                setattr(parent, child_name, original)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
