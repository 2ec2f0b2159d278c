"""The Model tab: the served model's id, revision and vocabularies, then its model card with the plots inlined."""

import base64
import html
import logging
import re
from pathlib import Path

from .settings import Settings

logger = logging.getLogger("fashion_hf.app")

CARD_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_CARD_IMAGE_BYTES = 2 * 1024 * 1024  # each plot travels inside the page's config


def model_card_markdown(service) -> str:
    """The served model's id and revision, its vocabulary sizes, then its model card (README.md) if it has one.

    `service` is the `TaggerService` (its config, settings, model id, revision and detail tags are read)."""
    config = service.config
    heads = ", ".join(f"{html.escape(name)} ({len(labels)})" for name, labels in config.attributes.items())
    card = read_model_card(service.settings)
    local = Path(service.model_id).is_dir()  # a Hub id as it is; of a local folder, its name only, not where it is
    model = f"{Path(service.model_id).resolve().name}` (a local folder)" if local else f"{service.model_id}`"
    return "\n".join(
        [
            f"**Model:** `{html.escape(model)}  ",
            f"**Revision:** `{html.escape(service.revision)}`  ",
            f"**Encoder:** `{html.escape(config.encoder_description)}` at {config.image_size[0]}x{config.image_size[1]} px  ",
            f"**Heads:** {heads}  ",
            f"**Tag vocabulary:** {len(config.tags)} tags ({len(service.detail_tags)} detail tags)",
            "",
            card or "_This model has no model card (README.md) yet._",
        ]
    )


def read_model_card(settings: Settings) -> str | None:
    """The model card's text, its relative image links (plots) inlined (a local folder) or pointed at the Hub."""
    folder = Path(settings.model)
    try:
        if folder.is_dir():
            readme, image_url = folder / "README.md", local_image_url(folder.resolve())
            if not readme.is_file():
                return None
        else:
            from huggingface_hub import hf_hub_download

            readme = hf_hub_download(settings.model, "README.md", revision=settings.model_revision)
            image_url = hub_image_url(settings.model, settings.model_revision or "main")
        text = Path(readme).read_text(encoding="utf-8")
    except Exception as error:  # noqa: BLE001 - the card is informative; the app serves without it
        logger.warning("No model card for %s: %s", settings.model, error)
        return None

    def link(match):
        target = match.group(2)
        url = None if re.match(r"^[a-z]+:|^/|^#", target) else image_url(target)
        return f"{match.group(1)}({url})" if url else match.group(0)

    if text.startswith("---"):
        text = text.split("---", 2)[-1]  # the YAML front matter is for the Hub, not for readers
    return re.sub(r"(!\[[^\]]*\])\(([^)\s]+)\)", link, text)


def local_image_url(base: Path):
    """A card image of a local model folder as a data URI: a served file's URL would show visitors where the model
    lies on disk. Only files inside the folder, of an image type, at most `MAX_CARD_IMAGE_BYTES`; else None."""

    def image_url(target: str) -> str | None:
        path = (base / target).resolve()
        kind = CARD_IMAGE_TYPES.get(path.suffix.lower())
        if kind is None or not path.is_relative_to(base) or not path.is_file():
            return None
        if path.stat().st_size > MAX_CARD_IMAGE_BYTES:
            logger.warning("Model card image %s is over %d bytes: not shown.", target, MAX_CARD_IMAGE_BYTES)
            return None
        return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"

    return image_url


def hub_image_url(model: str, revision: str):
    """A card image of a Hub model as its resolve URL at the served revision."""

    def image_url(target: str) -> str | None:
        return f"https://huggingface.co/{model}/resolve/{revision}/{target}"

    return image_url
