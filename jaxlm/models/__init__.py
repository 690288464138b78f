"""Transformer models as pure-functional flax modules, and their parameters as plain pytrees."""

from jaxlm.models.config import PRESETS, ModelConfig
from jaxlm.models.heads import SequenceClassifier
from jaxlm.models.lora import merge_lora
from jaxlm.models.params import abstract_params, init_params
from jaxlm.models.transformer import Decoder

__all__ = ["PRESETS", "Decoder", "ModelConfig", "SequenceClassifier", "abstract_params", "init_params", "merge_lora"]
