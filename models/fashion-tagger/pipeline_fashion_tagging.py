"""The `"fashion-tagging"` pipeline: images in, per-attribute labels and the generated tag sequence out."""

import numpy as np
import torch
from transformers import Pipeline

from .configuration_fashion_tagger import PAD_TAG_ID
from .modeling_fashion_tagger import FoldedTagger

RUNTIMES = ("torch", "onnx")


class FashionTaggingPipeline(Pipeline):
    """Tag product photos.

    ```python
    >>> tagger = pipeline("fashion-tagging", model="models/fashion-tagger")
    >>> tagger("photo.jpg", top_k=3)
    {"attributes": {"articleType": [{"label": "Tshirts", "score": 0.93}, ...], ...},
     "tags": [{"tag": "Tshirts", "group": "articleType", "score": 0.91}, ...],
     "not_sure": {"articleType": False, "season": True, ...},
     "out_of_distribution": {"score": 0.42, "threshold": 1.0, "flagged": False, "reason": "distance"},
     "turned_by": 0}
    >>> tagger([image_1, image_2], batch_size=32)  # a list of such dicts
    ```

    Scores are calibrated once `fashion-hf calibrate` has fitted the model (`config.attribute_temperatures`): a
    label at 90% is then right about 90% of the time. `not_sure[attribute]` is True when the top label's score is
    under that head's `config.confidence_thresholds` entry, chosen so that answers at or above it were right at least
    95% of the time on held-out photos (never True for a head without one). `out_of_distribution["score"]` says how
    far the photo is beyond what the model knows (`model.ood_signals`, each relative to its limit in
    `config.ood_thresholds`; `reason` names the largest: `distance` of its embedding to the training photos,
    `uncertainty` of its heads, or `turned`, the photo looks on its side or upside down, or one of its quarter turns
    looked clearly more upright though not enough to be tagged turned), and `flagged` when it is
    above 1: the photo does not look like an upright clothing or accessory photo, and its labels are guesses. It is
    None for a model without a detector. `turned_by` is 0, or the degrees (counter-clockwise: 90, 180, 270) the photo
    was turned before it was tagged, because it looked on its side or upside down and that turn looked upright
    (`config.upright_search`, `FashionTaggerPreTrainedModel.turn_upright`).

    Inputs are anything [`FashionTaggerImageProcessor`] reads: PIL images, numpy arrays, paths or encoded bytes.
    `top_k` labels per attribute (default 5), scores descending; `num_beams` for the tag decoder (default 1, greedy);
    `max_tags` caps the tag sequence (default the model's `max_tag_length`).

    `runtime="onnx"` (`pipeline("fashion-tagging", model=..., runtime="onnx")`, CPU only, needs `onnxruntime`) runs
    the image encoders with ONNX Runtime, several times faster on CPU, and the rest as PyTorch does: the same top
    labels, scores within 1e-3. The graphs come from the model folder's `onnx/` (`fashion-hf export-onnx`), else are
    exported once into `~/.cache/fashion_hf/onnx/` (see `onnx_runtime`). The default, `"torch"`, runs a copy of the
    encoders with their batch norms folded into the convolutions (`FoldedTagger`, taken when the pipeline is made):
    the model's own outputs to float rounding.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_video_processor = False
    _load_tokenizer = False

    def __init__(self, *args, runtime: str = "torch", **kwargs):
        super().__init__(*args, **kwargs)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.runtime = runtime
        if runtime == "torch":
            self.encoder = FoldedTagger(self.model)
        else:
            if self.model.device.type != "cpu":
                raise ValueError(f"runtime={runtime!r} runs on the CPU; the model is on {self.model.device}: pass device='cpu'")
            from .onnx_runtime import OnnxTagger  # imported only here: the default runtime needs no onnxruntime

            self.encoder = OnnxTagger.for_model(self.model, self.model.name_or_path)

    def _sanitize_parameters(self, top_k=None, num_beams=None, max_tags=None, **kwargs):
        forward_params = {}
        if num_beams is not None:
            forward_params["num_beams"] = int(num_beams)
        if max_tags is not None:
            forward_params["max_length"] = int(max_tags)
        postprocess_params = {"top_k": int(top_k)} if top_k is not None else {}
        return {}, forward_params, postprocess_params

    def preprocess(self, image):
        # Per image only the decoding and resizing; normalisation runs once per batch in _forward, on the model's
        # device. The key is "image" because the base class's collate concatenates that key as it is.
        processor = self.image_processor
        image = processor.load_image(image)
        inputs = {"image": torch.from_numpy(processor.to_model_size(image))[None]}
        if self.model.config.upright_search is not None:
            # What `turn_upright` would turn, should the photo look turned (about one in ten): the turns themselves
            # are made in _forward, for those photos only.
            inputs["turn_source"] = processor.turn_source(image)
        return inputs

    def _encode_quarter_turns(self, turn_sources: list) -> torch.Tensor:
        """Photos' turn sources -> the embeddings of their quarter turns, `(turns, photos, ...)` as `turn_upright`
        takes them."""
        turns = [self.image_processor.quarter_turns(image) for image in turn_sources]
        quarter_turns = torch.from_numpy(np.stack(turns))
        pixel_values = self.image_processor.turned_pixel_values(quarter_turns.to(self.model.device))
        image_embeds = self.encoder.encode_images(pixel_values.to(self.model.dtype))
        return image_embeds.unflatten(0, (quarter_turns.shape[1], quarter_turns.shape[0]))

    def _forward(self, model_inputs, num_beams=1, max_length=None):
        pixel_values = self.image_processor.normalize_pixels(model_inputs["image"].to(self.model.device))
        pixel_values = pixel_values.to(self.model.dtype)
        image_embeds = self.encoder.encode_images(pixel_values)
        # The base class's collate lists a batch's turn sources; a photo run alone keeps its own as it is.
        sources = model_inputs.get("turn_source")
        sources = sources if isinstance(sources, list) else [sources]
        image_embeds, turned_by, turn_gain = self.model.turn_upright(
            image_embeds, lambda rows: self._encode_quarter_turns([sources[row] for row in rows.tolist()])
        )
        outputs = self.model(image_embeds=image_embeds)
        hypotheses = self.model.generate_tags(image_embeds=image_embeds, num_beams=num_beams, max_length=max_length)
        # The base class splits batched outputs per image by indexing every value: keep them flat tensors.
        best = [image_hypotheses[0] for image_hypotheses in hypotheses]
        length = max((len(hypothesis["tag_ids"]) for hypothesis in best), default=0)
        tag_ids = torch.full((len(best), length), PAD_TAG_ID, dtype=torch.long)
        tag_scores = torch.zeros(len(best), length)
        for row, hypothesis in enumerate(best):
            tag_ids[row, : len(hypothesis["tag_ids"])] = torch.tensor(hypothesis["tag_ids"], dtype=torch.long)
            tag_scores[row, : len(hypothesis["tags"])] = torch.tensor([tag["score"] for tag in hypothesis["tags"]])
        probabilities = {f"probs:{name}": logits.float().softmax(-1).cpu() for name, logits in outputs.attribute_logits.items()}
        signals = self.model.ood_signals(image_embeds, outputs.attribute_logits, turn_gain) or {}
        ood = {f"ood:{name}": values.float().cpu() for name, values in signals.items()}
        return {**probabilities, **ood, "tag_ids": tag_ids, "tag_scores": tag_scores, "turned_by": turned_by.cpu()}

    def postprocess(self, model_outputs, top_k=5):
        config = self.model.config
        attributes = {}
        for name, labels in config.attributes.items():
            probabilities = model_outputs[f"probs:{name}"][0]
            scores, indices = probabilities.topk(min(top_k, len(labels)))
            attributes[name] = [{"label": labels[i], "score": s} for s, i in zip(scores.tolist(), indices.tolist())]
        tags = []
        for tag_id, score in zip(model_outputs["tag_ids"][0].tolist(), model_outputs["tag_scores"][0].tolist()):
            if tag_id == PAD_TAG_ID:
                break
            text, group = config.id_to_tag(tag_id)
            tags.append({"tag": text, "group": group, "score": score})
        not_sure = {name: config.is_not_sure(name, ranked[0]["score"]) for name, ranked in attributes.items()}
        signals = {key.removeprefix("ood:"): float(value[0]) for key, value in model_outputs.items() if key.startswith("ood:")}
        ood = None
        if signals:
            reason = max(signals, key=signals.get)
            ood = {"score": signals[reason], "threshold": 1.0, "flagged": signals[reason] > 1.0, "reason": reason}
        turned_by = int(model_outputs["turned_by"][0])
        return {"attributes": attributes, "tags": tags, "not_sure": not_sure, "out_of_distribution": ood, "turned_by": turned_by}


def save_tagger(model, image_processor, folder, **save_kwargs) -> None:
    """Write a Hub-ready model folder: weights, config, image processor and their code, and this pipeline's code
    named in the config's `custom_pipelines`, so that `pipeline(model=folder, trust_remote_code=True)` tags where
    fashion_hf is not installed. `save_kwargs` go to the model's `save_pretrained` (e.g. `state_dict`)."""
    FashionTaggingPipeline(model=model, image_processor=image_processor).save_pretrained(folder, **save_kwargs)


__all__ = ["FashionTaggingPipeline", "save_tagger"]
