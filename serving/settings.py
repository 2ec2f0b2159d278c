"""The app's configuration, read from the environment (a Space sets these as variables; README: "The app")."""

import os
from dataclasses import dataclass, field, fields

from fashion_hf.pipeline_fashion_tagging import RUNTIMES


@dataclass(frozen=True)
class Settings:
    """The app's configuration; `Settings.from_env()` reads each field from the variable named in its metadata."""

    model: str = field(default="models/fashion-tagger", metadata={"env": "FASHION_MODEL"})
    model_revision: str | None = field(default=None, metadata={"env": "FASHION_MODEL_REVISION"})
    runtime: str = field(default="torch", metadata={"env": "FASHION_RUNTIME"})  # "onnx": the pipeline's ONNX path
    feedback_dir: str = field(default="feedback", metadata={"env": "FEEDBACK_DIR"})
    feedback_repo: str | None = field(default=None, metadata={"env": "FEEDBACK_REPO"})
    feedback_every_minutes: float = field(default=5.0, metadata={"env": "FEEDBACK_EVERY_MINUTES"})
    examples_dir: str | None = field(default="examples", metadata={"env": "EXAMPLES_DIR"})
    max_upload_mb: float = field(default=10.0, metadata={"env": "MAX_UPLOAD_MB"})
    max_image_pixels: int = field(default=40_000_000, metadata={"env": "MAX_IMAGE_PIXELS"})
    max_images_per_request: int = field(default=32, metadata={"env": "MAX_IMAGES_PER_REQUEST"})
    concurrency: int = field(default=2, metadata={"env": "TAG_CONCURRENCY"})
    feedback_concurrency: int = field(default=1, metadata={"env": "FEEDBACK_CONCURRENCY"})
    max_batch_size: int = field(default=16, metadata={"env": "TAG_MAX_BATCH_SIZE"})
    queue_size: int = field(default=64, metadata={"env": "QUEUE_MAX_SIZE"})

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for setting in fields(cls):
            raw = environ.get(setting.metadata["env"], "").strip()
            if not raw:
                continue
            kind = type(setting.default) if setting.default is not None else str
            try:
                values[setting.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{setting.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values).validated()

    def validated(self) -> "Settings":
        positive = (
            "max_upload_mb", "max_image_pixels", "max_images_per_request", "concurrency", "feedback_concurrency",
            "max_batch_size",
        )  # fmt: skip
        if self.runtime not in RUNTIMES:
            raise ValueError(f"FASHION_RUNTIME must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        for setting in fields(self):
            if setting.name in positive and getattr(self, setting.name) <= 0:
                raise ValueError(f"{setting.metadata['env']} must be positive, got {getattr(self, setting.name)}")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
