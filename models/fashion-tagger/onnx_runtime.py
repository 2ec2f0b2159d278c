"""Run the tagger's image encoders with ONNX Runtime; the heads, the detector and the tag decoder stay PyTorch.

    >>> model = AutoModel.from_pretrained("models/fashion-tagger")
    >>> tagger = OnnxTagger.for_model(model, "models/fashion-tagger")  # its onnx/, or exported once into a cache
    >>> image_embeds = tagger.encode_images(pixel_values)              # what model.encode_images returns
    >>> tagger(image_embeds=image_embeds).attribute_logits             # everything else is the PyTorch model's

    fashion-hf export-onnx models/fashion-tagger [--quantize]         # writes models/fashion-tagger/onnx/

The encoders are where most of the time goes (an ensemble runs every member on each photo and its mirror). The
heads and the out-of-distribution signals are a few matrix products on the encoders' `image_embeds`; the tag decoder
is a loop of small steps already written out by hand for the CPU. They stay the PyTorch model's own code, the
reference, with its calibration, so ONNX changes nothing but the embeddings. An ensemble with user-photo experts exports
one graph per domain (`encoder-<domain>.onnx`): the general members' graph runs on every photo, and each expert
graph only on the photos the gate gives that domain, as `FashionTaggerEnsembleModel.encode_images` does.

A model folder's `onnx/` holds the graphs and `export.json`, the fingerprint of the weights they were exported from;
graphs of other weights are refused. A folder without them gets them exported once into
`~/.cache/fashion_hf/onnx/<fingerprint>/` ($FASHION_HF_ONNX_CACHE overrides that root), so users need no extra step.

This file travels with a saved model's code (the pipeline imports it), so onnxruntime is imported only when used.
"""

import copy
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_FOLDER = "onnx"
EXPORT_RECORD = "export.json"
OPSET = 17
QUANTIZED_SUFFIX = ".int8"
PIXEL_VALUES, IMAGE_EMBEDS = "pixel_values", "image_embeds"
CACHE_ENV = "FASHION_HF_ONNX_CACHE"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("runtime='onnx' needs ONNX Runtime: pip install onnxruntime") from None
    return onnxruntime


def cache_root() -> Path:
    """Where graphs exported on demand go, one `<fingerprint>/onnx/` each: $FASHION_HF_ONNX_CACHE, else
    ~/.cache/fashion_hf/onnx."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fashion_hf" / ONNX_FOLDER)


def weights_fingerprint(model) -> str:
    """SHA-256 of the config and every weight: graphs exported from one model are valid for that model only."""
    unrelated = ("_name_or_path", "transformers_version")
    config = {key: value for key, value in model.config.to_dict().items() if key not in unrelated}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Export: one graph per domain, pixel_values -> that domain's members' embeddings.
# ---------------------------------------------------------------------------------------------------------------------


def encoder_domains(model) -> dict[str, list[int] | None]:
    """Domain -> the indices of its members (the general domain first); a single model: its one domain -> None."""
    if not hasattr(model, "members"):
        return {model.config.photo_domains()[0]: None}
    return {domain: model.config.members_of(domain) for domain in model.config.domains}


def graph_name(domain: str, quantized: bool = False) -> str:
    return f"encoder-{domain}{QUANTIZED_SUFFIX if quantized else ''}.onnx"


class DomainEncoder(nn.Module):
    """What is exported for one domain: `(batch, 3, H, W)` -> its members' views `(batch, views, width)`, in the
    order `FashionTaggerEnsembleModel.encode_images` lays them out; a single model: `(batch, width)`."""

    def __init__(self, model, members: list[int] | None):
        super().__init__()
        self.model, self.members = model, members

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.members is None:
            return self.model.encode_images(pixel_values)
        views = [self.model.encode_member_views(index, pixel_values) for index in self.members]
        return torch.cat(views).transpose(0, 1)


def export_onnx(model, folder: str | Path) -> Path:
    """Export `model`'s encoders (float32, any batch size) into `folder/onnx/`; returns that folder."""
    output = Path(folder) / ONNX_FOLDER
    output.mkdir(parents=True, exist_ok=True)
    fingerprint = weights_fingerprint(model)  # of the weights as given: what `exported_folder` compares
    if next(model.parameters()).dtype != torch.float32:  # the graphs are float32; the caller's model stays as it is
        model = copy.deepcopy(model).float()
    model.eval()
    height, width = model.config.image_size
    example = torch.zeros(2, 3, height, width, device=next(model.parameters()).device)
    for domain, members in encoder_domains(model).items():
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated for torch.export's, which needs onnxscript as well; this one
            # exports these convolutional graphs fully, with a dynamic batch axis.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                DomainEncoder(model, members), (example,), str(output / graph_name(domain)), dynamo=False,
                input_names=[PIXEL_VALUES], output_names=[IMAGE_EMBEDS], opset_version=OPSET,
                dynamic_axes={PIXEL_VALUES: {0: "batch"}, IMAGE_EMBEDS: {0: "batch"}},
            )  # fmt: skip
    record = {"weights_sha256": fingerprint, "domains": list(encoder_domains(model)), "opset": OPSET}
    (output / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return output


def quantize_onnx(onnx_folder: str | Path, calibration_batches) -> list[Path]:
    """Write an INT8 copy of every graph in `onnx_folder` (`encoder-<domain>.int8.onnx`): static quantization,
    weights per channel and activations per tensor, the activation ranges measured on `calibration_batches`
    (an iterable of normalised `(batch, 3, H, W)` pixel values, read once per graph)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ImportError("quantizing needs ONNX Runtime and onnx: pip install onnxruntime onnx") from None

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration_batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {PIXEL_VALUES: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}

    calibration_batches = [torch.as_tensor(batch) for batch in calibration_batches]  # read once per graph
    onnx_folder = Path(onnx_folder)
    written = []
    for domain in json.loads((onnx_folder / EXPORT_RECORD).read_text(encoding="utf-8"))["domains"]:
        source, target = onnx_folder / graph_name(domain), onnx_folder / graph_name(domain, quantized=True)
        prepared = target.with_suffix(".prepared.onnx")
        # Folds batch norms and infers tensor shapes, as quantization wants (ONNX's shape inference: the symbolic
        # one gives up on the mirrored views' negative-step slice).
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        prepared.unlink()
        written.append(target)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Run: the graphs behind `encode_images`, the rest delegated to the PyTorch model.
# ---------------------------------------------------------------------------------------------------------------------


def session_options(threads: int | None = None):
    """One process's cores for each operator, one operator at a time (the graphs are a chain of convolutions),
    every graph optimisation."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    # The cores this process may use (not `.runtime`'s helper: this file travels alone with a model's code).
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spinning: they share the cores with decoding workers and the rest of the
    # model (one photo through the pipeline took 71 ms with spinning, 39 ms without; BENCHMARKS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def exported_folder(model, model_folder: str | Path | None = None) -> Path:
    """The `onnx/` folder with graphs of `model`'s weights: `model_folder`'s own, else the cache's (exported there
    now if it has none). A `model_folder/onnx/` of other weights raises, naming the command that re-exports it."""
    fingerprint = weights_fingerprint(model)
    if model_folder and (Path(model_folder) / ONNX_FOLDER / EXPORT_RECORD).is_file():  # "": a model built in memory
        folder = Path(model_folder) / ONNX_FOLDER
        if json.loads((folder / EXPORT_RECORD).read_text(encoding="utf-8"))["weights_sha256"] != fingerprint:
            raise ValueError(
                f"{folder} holds graphs of other weights than this model's: run `fashion-hf export-onnx "
                f"{model_folder}` again, or delete {folder}"
            )
        return folder
    cached = cache_root() / fingerprint
    if not (cached / ONNX_FOLDER / EXPORT_RECORD).is_file():
        temporary = cache_root() / f".{fingerprint}.{os.getpid()}"  # renamed whole: a killed export leaves no half
        export_onnx(model, temporary)
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(temporary, cached)
        except OSError:  # another process finished the same export first
            shutil.rmtree(temporary, ignore_errors=True)
    return cached / ONNX_FOLDER


class OnnxTagger:
    """A fashion tagger whose `encode_images` runs in ONNX Runtime: every other attribute (`config`, `forward`,
    `generate_tags`, `ood_scores`, `parameters`, ...) is the wrapped PyTorch model's, so code written for the model
    (`fashion_hf.tag.predict_batch`, evaluation) takes this in its place.

    `quantized=True` runs the INT8 graphs (`fashion-hf export-onnx --quantize`); `threads` defaults to the cores
    this process may use.
    """

    def __init__(self, model, onnx_folder: str | Path, quantized: bool = False, threads: int | None = None):
        ort = _onnxruntime()
        self.model = model.eval()
        self.onnx_folder = Path(onnx_folder)
        options = session_options(threads)
        self.sessions = {}
        for domain in encoder_domains(model):
            path = self.onnx_folder / graph_name(domain, quantized)
            if not path.is_file():
                hint = " (made by `fashion-hf export-onnx MODEL --quantize`)" if quantized else ""
                raise FileNotFoundError(f"{path} is missing{hint}")
            self.sessions[domain] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def for_model(cls, model, model_folder: str | Path | None = None, **kwargs) -> "OnnxTagger":
        """`model`'s graphs from `model_folder/onnx/`, or exported once into the cache (see the module's docstring)."""
        return cls(model, exported_folder(model, model_folder), **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)  # only reached for what this class does not define itself

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def _run(self, domain: str, pixel_values: torch.Tensor) -> torch.Tensor:
        inputs = {PIXEL_VALUES: np.ascontiguousarray(pixel_values.detach().cpu().numpy(), dtype=np.float32)}
        (embeds,) = self.sessions[domain].run([IMAGE_EMBEDS], inputs)
        return torch.from_numpy(embeds).to(self.model.dtype)  # the heads' dtype; the graphs run float32

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`model.encode_images(pixel_values)`, from the graphs: experts run only on the rows the gate gives them."""
        domains = list(self.sessions)
        general = self._run(domains[0], pixel_values)
        if len(domains) == 1:
            return general
        views = self.model.domain_views()
        embeds = general.new_zeros(general.shape[0], sum(map(len, views)), general.shape[-1])
        embeds[:, views[0]] = general
        weights = self.model._gate_weights(general)
        for domain_index, domain in enumerate(domains[1:], start=1):
            rows = weights[:, domain_index] > 0
            if rows.any():
                expert = general.new_zeros(general.shape[0], len(views[domain_index]), general.shape[-1])
                expert[rows] = self._run(domain, pixel_values[rows])
                embeds[:, views[domain_index]] = expert
        return embeds


__all__ = ["OnnxTagger", "export_onnx", "exported_folder", "quantize_onnx", "weights_fingerprint"]
