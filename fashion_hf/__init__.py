"""fashion-hf: tag fashion product photos with a Hugging Face-native CNN encoder, attribute heads and a tag decoder."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_fashion_tagger import FashionTaggerConfig, tag_key
from .image_processing_fashion_tagger import FashionTaggerImageProcessor, InvalidImageError
from .modeling_fashion_tagger import FashionTaggerModel, FashionTaggerOutput
from .pipeline_fashion_tagging import FashionTaggingPipeline

TASK = "fashion-tagging"

AutoConfig.register(FashionTaggerConfig.model_type, FashionTaggerConfig, exist_ok=True)
AutoModel.register(FashionTaggerConfig, FashionTaggerModel, exist_ok=True)
AutoImageProcessor.register(FashionTaggerConfig, slow_image_processor_class=FashionTaggerImageProcessor, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=FashionTaggingPipeline, pt_model=AutoModel, type="image")

# A saved or pushed folder then carries this code and loads with trust_remote_code=True where fashion_hf is absent.
FashionTaggerConfig.register_for_auto_class()
FashionTaggerModel.register_for_auto_class("AutoModel")
FashionTaggerImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "TASK",
    "FashionTaggerConfig",
    "FashionTaggerImageProcessor",
    "FashionTaggerModel",
    "FashionTaggerOutput",
    "FashionTaggingPipeline",
    "InvalidImageError",
    "tag_key",
]
