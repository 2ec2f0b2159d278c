"""The pipeline the app serves, loaded once at start-up, and which revision of the model it is."""

import hashlib
from pathlib import Path

import torch
from transformers import pipeline

from fashion_hf import TASK

from .settings import Settings


def load_tagger(settings: Settings):
    """The pipeline, loaded once at start-up, with the app's upload limits applied to its image processor."""
    device = 0 if torch.cuda.is_available() else -1
    try:
        options = {} if settings.runtime == "torch" else {"runtime": settings.runtime, "device": -1}  # ONNX: CPU
        tagger = pipeline(TASK, model=settings.model, revision=settings.model_revision, **{"device": device, **options})
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"Could not load the model {settings.model!r} ({error}). Train one (see the README) or set FASHION_MODEL "
            "to a local model folder or a Hub model id."
        ) from error
    tagger.image_processor.max_file_bytes = settings.max_upload_bytes
    tagger.image_processor.max_image_pixels = settings.max_image_pixels
    return tagger


def served_revision(tagger, settings: Settings) -> str:
    """The Hub commit of the served model, or for a local folder a digest of its weights."""
    commit = getattr(tagger.model.config, "_commit_hash", None)
    if commit:
        return commit
    folder = Path(settings.model)
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights:
        return settings.model_revision or "unknown"
    digest = hashlib.sha256()
    for path in weights:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "local-" + digest.hexdigest()[:12]
