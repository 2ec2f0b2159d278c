"""fashion-hf: tag fashion product photos with a Hugging Face-native CNN encoder, attribute heads and a tag decoder."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_fashion_tagger import FashionTaggerConfig, FashionTaggerEnsembleConfig, tag_key
from .image_processing_fashion_tagger import FashionTaggerImageProcessor, InvalidImageError
from .modeling_fashion_tagger import FashionTaggerEnsembleModel, FashionTaggerModel, FashionTaggerOutput
from .pipeline_fashion_tagging import FashionTaggingPipeline

TASK = "fashion-tagging"

for config_class, model_class in ((FashionTaggerConfig, FashionTaggerModel), (FashionTaggerEnsembleConfig, FashionTaggerEnsembleModel)):
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    # One class answers either backend request: it decodes and resizes with PIL and normalises with torch, needing no
    # torchvision. Registered only as "pil", transformers asks for "torchvision" whenever torchvision is installed and
    # logs a fallback on every load.
    image_processors = {backend: FashionTaggerImageProcessor for backend in ("torchvision", "pil")}
    AutoImageProcessor.register(config_class, image_processor_classes=image_processors, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=FashionTaggingPipeline, pt_model=AutoModel, type="image")

# A saved or pushed folder then carries this code and loads with trust_remote_code=True where fashion_hf is absent.
FashionTaggerConfig.register_for_auto_class()
FashionTaggerEnsembleConfig.register_for_auto_class()
FashionTaggerModel.register_for_auto_class("AutoModel")
FashionTaggerEnsembleModel.register_for_auto_class("AutoModel")
FashionTaggerImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "TASK",
    "FashionTaggerConfig",
    "FashionTaggerEnsembleConfig",
    "FashionTaggerEnsembleModel",
    "FashionTaggerImageProcessor",
    "FashionTaggerModel",
    "FashionTaggerOutput",
    "FashionTaggingPipeline",
    "InvalidImageError",
    "tag_key",
]
