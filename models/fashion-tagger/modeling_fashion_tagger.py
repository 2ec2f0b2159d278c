"""The fashion tagger: a timm CNN encoder, one linear head per attribute, and a recurrent tag decoder.

The decoder follows Show and Tell (Vinyals et al., 2015) and the CNN-RNN multi-label design (Wang et al., 2016):
its initial hidden state is a projection of the image embedding, and the image is not fed again at later steps.
"""

import copy
import math
from dataclasses import dataclass
from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_fashion_tagger import (
    BOS_TAG_ID,
    EOS_TAG_ID,
    IGNORE_INDEX,
    PAD_TAG_ID,
    SPECIAL_TAGS,
    FashionTaggerConfig,
    QUARTER_TURNS,
    FashionTaggerEnsembleConfig,
)


@dataclass
class FashionTaggerOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean attribute cross-entropy plus `tag_loss_weight` times the tag cross-entropy, over the labels given.
        attribute_logits (`dict[str, torch.FloatTensor]`):
            Attribute name -> logits of shape `(batch_size, num_labels)`.
        tag_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length - 1, tag_vocab_size)`, *optional*):
            Teacher-forced next-tag logits, when `tag_ids` were given.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
            Pooled image embedding from the encoder.
    """

    loss: torch.FloatTensor | None = None
    attribute_logits: dict[str, torch.FloatTensor] | None = None
    tag_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


def create_encoder(config: FashionTaggerConfig) -> nn.Module:
    """The timm backbone without classifier; pretrained weights are loaded after `post_init` (see `encoder_weights`)."""
    return timm.create_model(config.encoder_name, pretrained=False, num_classes=0, **config.encoder_kwargs)


def encoder_output_width(encoder: nn.Module) -> int:
    # Some timm models (MobileNetV3) pool to `head_hidden_size`, not `num_features`.
    return getattr(encoder, "head_hidden_size", None) or encoder.num_features


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold every batch norm into the convolution just before it, in place, for inference: the norm's running
    statistics and affine become the convolution's weight and bias, and only its activation (timm's `BatchNormAct2d`)
    stays. The outputs agree to float rounding; the parameters no longer match the checkpoint's, so fold a copy."""
    for parent in module.modules():
        previous = None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d) and previous.out_channels == child.num_features:
                weight, bias = fuse_conv_bn_weights(
                    previous.weight.float(), None if previous.bias is None else previous.bias.float(),
                    child.running_mean.float(), child.running_var.float(), child.eps, child.weight.float(), child.bias.float(),
                )  # fmt: skip
                previous.weight = nn.Parameter(weight.to(previous.weight.dtype), requires_grad=False)
                previous.bias = nn.Parameter(bias.to(previous.weight.dtype), requires_grad=False)
                setattr(parent, name, nn.Sequential(child.drop, child.act) if hasattr(child, "act") else nn.Identity())
            previous = child
    return module


class FoldedTagger:
    """A fashion tagger whose `encode_images` runs a copy of its encoders with the batch norms folded into the
    convolutions (`fold_batch_norms`), 1.2-1.5x faster on CPU; every other attribute (`config`, `forward`,
    `generate_tags`, `state_dict`, ...) is the wrapped model's, which stays as it was. The copy is taken once: wrap
    the model again after changing its weights. The pipeline's and `fashion-hf tag`'s "torch" runtime."""

    def __init__(self, model: "FashionTaggerPreTrainedModel"):
        self.model = model.eval()
        # The copy shares every tensor with the model (folding assigns new weights, it never writes into a tensor),
        # so only the folded convolutions take memory of their own, not the heads, decoders and detector.
        shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
        self._folded = fold_batch_norms(copy.deepcopy(model, shared)).eval()

    def __getattr__(self, name):
        if name in ("model", "_folded"):  # asked before __init__ set them (copy, pickle): no endless recursion
            raise AttributeError(name)
        return getattr(self.model, name)  # only reached for what this class does not define itself

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._folded.encode_images(pixel_values)


def fast_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) as 2 sigmoid(2x) - 1: equal to `torch.tanh` within 2e-7, and faster on CPU, where torch's tanh kernel
    took 43 us against 18 us for a 64x512 batch on the dev machine (once per decoding step, so it adds up)."""
    return torch.sigmoid(2.0 * x).mul_(2.0).sub_(1.0)


def runs_bfloat16_natively(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def tag_conflicts(config: FashionTaggerConfig, device=None) -> torch.Tensor:
    """`(V, V)` mask: emitting tag `i` forbids tag `j` later. A tag is never repeated, and an attribute takes one value."""
    group_names = list(config.attributes)
    # Group index per token: -1 for special and detail tokens, which conflict only with themselves.
    groups = [-1] * len(SPECIAL_TAGS) + [group_names.index(g) if g in group_names else -1 for _, g in config.tags]
    groups = torch.tensor(groups, device=device)
    same_attribute = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    conflicts = same_attribute | torch.eye(len(groups), dtype=torch.bool, device=device)
    conflicts[EOS_TAG_ID] = False
    return conflicts


def summed_entropy(attribute_logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """`(batch,)`: the entropy of every head's distribution, summed: high when the heads spread their belief."""
    entropies = []
    for logits in attribute_logits.values():
        log_probs = logits.float().log_softmax(-1)
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.stack(entropies).sum(0)


def hierarchy_table(config: FashionTaggerConfig, name: str) -> torch.Tensor:
    """`(finer labels, labels)`: P(label of head `name` | finer label) from `config.label_hierarchy`; zero rows for
    finer labels the table does not know."""
    link = config.label_hierarchy[name]
    finer, labels = config.attributes[link["from"]], config.attributes[name]
    finer_index, label_index = {label: i for i, label in enumerate(finer)}, {label: i for i, label in enumerate(labels)}
    entries = [(finer_index[label], label_index[group], probability)
               for label, groups in link["parents"].items() for group, probability in groups.items()]  # fmt: skip
    table = torch.zeros(len(finer), len(labels))
    if entries:  # built in one indexed write: this runs in every calibrated forward
        rows, columns, probabilities = zip(*entries)
        table[list(rows), list(columns)] = torch.tensor(probabilities)
    return table


def follow_label_hierarchy(attribute_logits: dict[str, torch.Tensor], config: FashionTaggerConfig) -> dict[str, torch.Tensor]:
    """The heads of `config.label_hierarchy` answered from their finer heads: log P(group) = log sum P(label)
    P(group | label). A phone photo's articleType head, trained on specific labels, often knows "Dresses" where its
    subCategory head says "Topwear"; summed, both say Dress."""
    if not config.label_hierarchy:
        return attribute_logits
    answered = dict(attribute_logits)
    for name, link in config.label_hierarchy.items():
        finer = attribute_logits[link["from"]].float().softmax(-1)
        table = hierarchy_table(config, name).to(finer.device)
        unknown = finer @ (1.0 - table.sum(-1)).clamp_min(0.0)
        probabilities = finer @ table + unknown[..., None] * attribute_logits[name].float().softmax(-1)
        answered[name] = probabilities.clamp_min(1e-12).log()
    return answered


def select_rows(state, rows: torch.Tensor):
    """Batch rows of a decoder state: a `(layers, batch, hidden)` tensor, or tuples and lists of them (an LSTM's
    `(h, c)`, an ensemble's member states)."""
    if isinstance(state, torch.Tensor):
        return state[:, rows]
    return type(state)(select_rows(part, rows) for part in state)


class FashionTaggerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and tag decoding shared by the single model and the ensemble. Subclasses give
    `encode_images` and `_decoding_start(image_embeds) -> (initial state, step)`, where
    `step(tokens, state, banned) -> (next-tag log-probabilities, state)`."""

    config_class = FashionTaggerConfig
    base_model_prefix = "fashion_tagger"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module):
        # The timm encoder initialises itself (or receives pretrained weights later): only touch our own layers.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            module.weight[PAD_TAG_ID].zero_()
        elif isinstance(module, (nn.GRU, nn.LSTM)):
            for name, weight in module.named_parameters():
                if "bias" in name:
                    nn.init.zeros_(weight)
                else:
                    nn.init.orthogonal_(weight)

    def _add_ood_detector(self, width: int) -> None:
        """Buffers of the out-of-distribution detector, when the config has one (`ood_thresholds`), fitted by
        `fashion-hf calibrate`: a mean of the normalised embeddings per domain, the inverse of their pooled
        covariance, and a linear probe (weights, then bias) telling a turned photo from an upright one."""
        if self.config.ood_thresholds is not None:
            self.register_buffer("ood_means", torch.zeros(len(self.config.photo_domains()), width))
            self.register_buffer("ood_precision", torch.zeros(width, width))
            self.register_buffer("ood_turned", torch.zeros(width + 1))
        if self.config.upright_search is not None:
            # Rows: upright, then each of QUARTER_TURNS; columns: weights, then bias.
            self.register_buffer("ood_orientation", torch.zeros(1 + len(QUARTER_TURNS), width + 1))

    def drop_calibration(self) -> "FashionTaggerPreTrainedModel":
        """The model as trained: no temperatures, tag scaling, thresholds or detector (training starts from here,
        and a calibration fitted to these weights would not fit the next ones)."""
        self.config.without_calibration()
        for name in ("ood_means", "ood_precision", "ood_turned", "ood_orientation"):
            self._buffers.pop(name, None)
        return self

    def ood_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, width)`: the embedding the out-of-distribution signals read, L2-normalised (a flat colour and a
        photo differ in direction more than in length)."""
        raise NotImplementedError

    def ood_distance(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch,)`: the smallest Mahalanobis distance of `ood_features` to a domain's mean (Lee et al., 2018)."""
        centred = self.ood_features(image_embeds).float()[:, None] - self.ood_means.float()[None]
        squared = torch.einsum("bdw,wv,bdv->bd", centred, self.ood_precision.float(), centred)
        return squared.clamp_min(0).sqrt().min(1).values

    def turned_probability(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch,)`: how likely each photo is turned by 90, 180 or 270 degrees (the probe in `ood_turned`)."""
        probe = self.ood_turned.float()
        return torch.sigmoid(self.ood_features(image_embeds).float() @ probe[:-1] + probe[-1])

    def upright_probability(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch,)`: how likely each photo is the right way up as given (the four-way probe in `ood_orientation`:
        upright, or turned by one of `QUARTER_TURNS`)."""
        probe = self.ood_orientation.float()
        return (self.ood_features(image_embeds).float() @ probe[:, :-1].T + probe[:, -1]).softmax(-1)[:, 0]

    def turn_upright(self, image_embeds: torch.Tensor, encode_turns) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embeddings to tag each photo by, the degrees (counter-clockwise) each was turned for it, and each
        photo's `turn_gain`: how much more upright its best turn looked than the photo as tagged.

        A photo whose upright probability is under `config.upright_search["below"]` is also encoded turned by each of
        `QUARTER_TURNS`: `encode_turns(rows)` gives those rows' embeddings so turned, `(len(QUARTER_TURNS), rows,
        ...)`. The most upright turn replaces the photo where it looks upright by `margin` more than the photo as
        given; the margin keeps upright photos the probe is unsure of from being turned (`fashion-hf calibrate`
        measures both: its report's `rotated` section). A photo left as given keeps its gain, which `ood_signals`
        flags above `flag_margin`; a turned photo, or one whose turns were not tried, has a gain of 0. Without
        `upright_search`, or for photos that look upright, the embeddings are returned as they are, turned by 0.
        """
        turned_by = torch.zeros(len(image_embeds), dtype=torch.long, device=image_embeds.device)
        turn_gain = torch.zeros(len(image_embeds), device=image_embeds.device)
        search = self.config.upright_search
        if search is None:
            return image_embeds, turned_by, turn_gain
        upright = self.upright_probability(image_embeds)
        rows = torch.nonzero(upright < search["below"]).flatten()
        if not len(rows):
            return image_embeds, turned_by, turn_gain
        turns = encode_turns(rows)
        candidates = torch.stack([self.upright_probability(embeds) for embeds in turns])  # (turns, rows)
        best, best_turn = candidates.max(0)
        gain = best - upright[rows]
        better = gain > search["margin"]
        chosen, chosen_turn = rows[better], best_turn[better]
        image_embeds = image_embeds.clone()
        image_embeds[chosen] = turns[chosen_turn, torch.nonzero(better).flatten()].to(image_embeds.dtype)
        turned_by[chosen] = torch.as_tensor(QUARTER_TURNS, device=turned_by.device)[chosen_turn]
        turn_gain[rows[~better]] = gain[~better]
        return image_embeds, turned_by, turn_gain

    def ood_signals(
        self, image_embeds: torch.Tensor, attribute_logits: dict[str, torch.Tensor], turn_gain: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | None:
        """Each out-of-distribution signal (`config.ood_thresholds`' keys) divided by its limit, `(batch,)` each:
        above 1 is beyond what held-out product and phone photos reach. None without a detector. `turn_gain`, from
        `turn_upright`, also raises `turned` to `turn_gain / upright_search["flag_margin"]` where the config has one:
        a photo whose quarter turn looked clearly more upright, though not enough to be tagged turned."""
        limits = self.config.ood_thresholds
        if limits is None:
            return None
        heads = self.config.ood_uncertainty_heads or list(attribute_logits)
        signals = {
            "distance": self.ood_distance(image_embeds),
            "uncertainty": summed_entropy({name: attribute_logits[name] for name in heads}),
            "turned": self.turned_probability(image_embeds),
        }
        signals = {name: value / limits[name] for name, value in signals.items()}
        flag_margin = (self.config.upright_search or {}).get("flag_margin")
        if turn_gain is not None and flag_margin is not None:
            signals["turned"] = torch.maximum(signals["turned"], turn_gain.float() / flag_margin)
        return signals

    def ood_scores(
        self, image_embeds: torch.Tensor, attribute_logits: dict[str, torch.Tensor], turn_gain: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """`(batch,)`: how far each photo is beyond what the model knows, 1 at the edge: the largest of
        `ood_signals` (its embedding's distance to the training photos, its heads' summed entropy from `forward`'s
        `attribute_logits`, the chance it is turned). Above 1: not an upright product photo. None without a detector."""
        signals = self.ood_signals(image_embeds, attribute_logits, turn_gain)
        return None if signals is None else torch.stack(list(signals.values())).amax(0)

    def scaled_tag_score(self, log_prob: float, group: str) -> float:
        """A generated tag's score: its step probability, Platt-scaled by `config.tag_score_scaling[group]` if set."""
        scaling = self.config.tag_score_scaling.get(group)
        if scaling is None:
            return math.exp(log_prob)
        a, b = scaling
        probability = min(max(math.exp(log_prob), 1e-6), 1 - 1e-6)  # the clipping `calibration` fitted with
        return 1.0 / (1.0 + math.exp(-(a * math.log(probability / (1 - probability)) + b)))

    def _image_embeds(self, pixel_values: torch.Tensor | None, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """The given embeddings (cached, or shared between `forward` and `generate_tags`), else the encoder's."""
        if image_embeds is not None:
            return image_embeds
        if pixel_values is None:
            raise ValueError(f"{type(self).__name__} needs pixel_values or image_embeds")
        return self.encode_images(pixel_values)

    @torch.no_grad()
    def generate_tags(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        num_beams: int = 1,
        max_length: int | None = None,
    ) -> list[list[dict]]:
        """Decode the tag sequences of a whole batch at once.

        Greedy when `num_beams == 1`, beam search otherwise. A sequence ends at `<eos>` or after `max_length` tags
        (default `config.max_tag_length`), so decoding always terminates. A tag is never emitted twice, and an
        attribute (e.g. articleType) contributes at most one tag.

        Returns, per image, its hypotheses sorted by score (one for greedy, up to `num_beams` for beam search):
        `{"tags": [{"tag", "group", "score"}, ...], "tag_ids": [...], "score": total log-probability}`, where a tag's
        score is its probability at the step it was emitted (calibrated by `config.tag_score_scaling` where set).
        """
        image_embeds = self._image_embeds(pixel_values, image_embeds)
        max_length = self.config.max_tag_length if max_length is None else max_length
        state, step = self._decoding_start(image_embeds)
        batch, device = image_embeds.shape[0], image_embeds.device
        conflicts = tag_conflicts(self.config, device)
        if num_beams == 1:
            decoded = self._greedy_decode(state, step, batch, device, max_length, conflicts)
        else:
            decoded = self._beam_decode(state, step, batch, device, max_length, num_beams, conflicts)
        return self._hypotheses(*decoded)

    def _initial_banned(self, rows: int, device) -> torch.Tensor:
        banned = torch.zeros(rows, self.config.tag_vocab_size, dtype=torch.bool, device=device)
        banned[:, [PAD_TAG_ID, BOS_TAG_ID]] = True
        return banned

    def _greedy_decode(self, state, step, batch, device, max_length, conflicts):
        tokens = torch.full((batch,), BOS_TAG_ID, dtype=torch.long, device=device)
        banned = self._initial_banned(batch, device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        scores = torch.zeros(batch, device=device)
        tag_ids, tag_log_probs = [], []
        for _ in range(max_length):
            log_probs, state = step(tokens, state, banned)
            step_log_probs, tokens = log_probs.max(-1)
            tokens = tokens.masked_fill(finished, PAD_TAG_ID)
            step_log_probs = step_log_probs.masked_fill(finished, 0.0)
            scores += step_log_probs
            tag_ids.append(tokens)
            tag_log_probs.append(step_log_probs)
            banned |= conflicts[tokens]
            finished |= tokens == EOS_TAG_ID
            if finished.all():
                break
        return torch.stack(tag_ids, 1)[:, None], torch.stack(tag_log_probs, 1)[:, None], scores[:, None]

    def _beam_decode(self, state, step, batch, device, max_length, num_beams, conflicts):
        vocab = self.config.tag_vocab_size
        rows = batch * num_beams
        state = select_rows(state, torch.arange(batch, device=device).repeat_interleave(num_beams))
        tokens = torch.full((rows,), BOS_TAG_ID, dtype=torch.long, device=device)
        banned = self._initial_banned(rows, device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        # All beams start identical: keep only the first alive so the first step does not pick one tag k times.
        beam_scores = torch.full((batch, num_beams), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0
        tag_ids = torch.empty(rows, 0, dtype=torch.long, device=device)
        tag_log_probs = torch.empty(rows, 0, device=device)
        row_offsets = (torch.arange(batch, device=device) * num_beams)[:, None]
        for _ in range(max_length):
            log_probs, state = step(tokens, state, banned)
            # A finished hypothesis continues only with <pad>, at no cost, so it competes with live ones as it is.
            log_probs[finished] = float("-inf")
            log_probs[finished, PAD_TAG_ID] = 0.0
            candidates = (beam_scores.view(-1, 1) + log_probs).view(batch, num_beams * vocab)
            beam_scores, flat_index = candidates.topk(num_beams, dim=-1)
            source_rows = (row_offsets + flat_index // vocab).view(-1)
            tokens = (flat_index % vocab).view(-1)

            step_log_probs = log_probs[source_rows, tokens]
            state = select_rows(state, source_rows)
            tag_ids = torch.cat([tag_ids[source_rows], tokens[:, None]], 1)
            tag_log_probs = torch.cat([tag_log_probs[source_rows], step_log_probs[:, None]], 1)
            banned = banned[source_rows] | conflicts[tokens]
            finished = finished[source_rows] | (tokens == EOS_TAG_ID) | (tokens == PAD_TAG_ID)
            if finished.all():
                break
        shape = (batch, num_beams, -1)
        return tag_ids.view(shape), tag_log_probs.view(shape), beam_scores

    def _hypotheses(self, tag_ids, tag_log_probs, scores) -> list[list[dict]]:
        results = []
        for image_ids, image_log_probs, image_scores in zip(tag_ids.tolist(), tag_log_probs.tolist(), scores.tolist()):
            hypotheses = []
            for ids, log_probs, score in zip(image_ids, image_log_probs, image_scores):
                if score == float("-inf"):  # a beam that never had a valid continuation
                    continue
                tags, kept_ids = [], []
                for tag_id, log_prob in zip(ids, log_probs):
                    if tag_id in (EOS_TAG_ID, PAD_TAG_ID):
                        break
                    text, group = self.config.id_to_tag(tag_id)
                    tags.append({"tag": text, "group": group, "score": self.scaled_tag_score(log_prob, group)})
                    kept_ids.append(tag_id)
                hypotheses.append({"tags": tags, "tag_ids": kept_ids, "score": score})
            results.append(sorted(hypotheses, key=lambda hypothesis: hypothesis["score"], reverse=True))
        return results


class FashionTaggerModel(FashionTaggerPreTrainedModel):
    def __init__(self, config: FashionTaggerConfig):
        if getattr(config, "members", None) is not None:  # else from_pretrained would quietly initialise at random
            raise ValueError(
                "this config describes an ensemble: load it with AutoModel or FashionTaggerEnsembleModel, and train "
                "(--init-from) from one of its members' folders"
            )
        super().__init__(config)
        self.encoder = create_encoder(config)
        embed_dim = encoder_output_width(self.encoder)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(embed_dim, len(labels)) for name, labels in config.attributes.items()})

        hidden, layers = config.decoder_hidden_size, config.decoder_num_layers
        states_per_layer = 2 if config.decoder_type == "lstm" else 1  # LSTM starts from (h, c)
        self.initial_state = nn.Linear(embed_dim, hidden * layers * states_per_layer)
        self.tag_embeddings = nn.Embedding(config.tag_vocab_size, config.tag_embedding_size, padding_idx=PAD_TAG_ID)
        rnn_class = nn.LSTM if config.decoder_type == "lstm" else nn.GRU
        self.decoder = rnn_class(config.tag_embedding_size, hidden, num_layers=layers, batch_first=True)
        self.tag_classifier = nn.Linear(hidden, config.tag_vocab_size)
        self._encoder_module_ids = {id(module) for module in self.encoder.modules()}
        self._input_gates_cache = None
        self._add_ood_detector(embed_dim)
        self.post_init()

    def _init_weights(self, module):
        if id(module) not in self._encoder_module_ids:
            super()._init_weights(module)

    # --- encoder and heads -------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Channels-last inputs make the convolutions keep that layout, ~1.4x faster on CPU (oneDNN) and the layout
        # tensor cores want; the weights keep theirs, so checkpoints do not change.
        return self.encoder(pixel_values.contiguous(memory_format=torch.channels_last))

    def ood_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_embeds.float(), dim=-1)

    def domain_weights(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, 1)` ones: a single model has one domain (see the ensemble's)."""
        return image_embeds.new_ones(image_embeds.shape[0], 1, dtype=torch.float32)

    def domain_attribute_log_probs(self, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute -> `(1, batch, C)` log-probabilities of the heads, before calibration (what it is fitted on)."""
        features = self.dropout(image_embeds)
        return {name: head(features).float().log_softmax(-1)[None] for name, head in self.heads.items()}

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        attribute_labels: torch.Tensor | None = None,
        tag_ids: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        calibrated: bool = True,
        **kwargs,
    ) -> FashionTaggerOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Images from [`FashionTaggerImageProcessor`]. Not needed when `image_embeds` are given (cached embeddings).
        attribute_labels (`torch.LongTensor` of shape `(batch_size, num_attributes)`, *optional*):
            Label index per attribute, in `config.attributes` order; `-100` where the label is missing.
        tag_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            `<bos> tag ... tag <eos>` padded with `<pad>`, for teacher forcing.

        The loss is computed on the heads' own logits; the `attribute_logits` returned are divided by each head's
        calibrated temperature (`config.attribute_temperatures`, 1 until `fashion-hf calibrate` sets it), and the
        heads of `config.label_hierarchy` answer from their finer heads, unless `calibrated=False` (evaluation's
        "before" figures).
        """
        image_embeds = self._image_embeds(pixel_values, image_embeds)
        features = self.dropout(image_embeds)
        attribute_logits = {name: head(features) for name, head in self.heads.items()}
        tag_logits = self._teacher_forced_tag_logits(features, tag_ids) if tag_ids is not None else None

        loss = None
        if attribute_labels is not None or tag_ids is not None:
            loss = self._loss(attribute_logits, attribute_labels, tag_logits, tag_ids)
        if calibrated and self.config.attribute_temperatures:
            attribute_logits = {name: logits / self.config.temperatures(name)[0] for name, logits in attribute_logits.items()}
        if calibrated:
            attribute_logits = follow_label_hierarchy(attribute_logits, self.config)
        return FashionTaggerOutput(
            loss=loss, attribute_logits=attribute_logits, tag_logits=tag_logits, image_embeds=image_embeds
        )

    def _loss(self, attribute_logits, attribute_labels, tag_logits, tag_ids) -> torch.Tensor:
        smoothing = self.config.label_smoothing
        losses = []
        if attribute_labels is not None:
            for column, logits in enumerate(attribute_logits.values()):
                labels = attribute_labels[:, column]
                # cross_entropy over an all-ignored batch is NaN: a head with no labels here simply adds nothing.
                if (labels != IGNORE_INDEX).any():
                    losses.append(F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=smoothing))
        loss = torch.stack(losses).mean() if losses else attribute_logits[next(iter(attribute_logits))].sum() * 0.0
        # Rows whose tag sequence is unknown have only `<pad>` targets. A batch of only those adds a zero that keeps
        # the decoder in the graph (cross-entropy over no target is NaN; distributed training wants every gradient).
        if tag_ids is not None and not (tag_ids[:, 1:] != PAD_TAG_ID).any():
            loss = loss + 0.0 * tag_logits.sum()
        elif tag_ids is not None:
            targets = tag_ids[:, 1:]
            tag_loss = F.cross_entropy(
                tag_logits.float().reshape(-1, tag_logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=PAD_TAG_ID,
                label_smoothing=smoothing,
            )
            loss = loss + self.config.tag_loss_weight * tag_loss
        return loss

    # --- tag decoder -------------------------------------------------------------------------------------------

    def _initial_decoder_state(self, features: torch.Tensor):
        layers, hidden = self.config.decoder_num_layers, self.config.decoder_hidden_size
        state = torch.tanh(self.initial_state(features))
        state = state.view(features.shape[0], -1, layers, hidden).permute(1, 2, 0, 3).contiguous()
        return (state[0], state[1]) if self.config.decoder_type == "lstm" else state[0]

    def _teacher_forced_tag_logits(self, features: torch.Tensor, tag_ids: torch.Tensor) -> torch.Tensor:
        inputs = self.tag_embeddings(tag_ids[:, :-1])
        outputs, _ = self.decoder(inputs, self._initial_decoder_state(features))
        return self.tag_classifier(outputs)

    @torch.no_grad()
    def _tag_input_gates(self) -> torch.Tensor:
        """Layer-0 input gates of every tag, `(V, gates)`. The decoder's only inputs are tag embeddings, so one
        matrix product replaces one per step: about a third of each step's work. Kept until the weights it comes
        from change: in place (an optimizer step, `load_state_dict`), by moving or casting the model. Writes through
        `.data` bypass the version counters this relies on; set `_input_gates_cache = None` after those."""
        sources = (self.tag_embeddings.weight, self.decoder.weight_ih_l0, self.decoder.bias_ih_l0)
        key = tuple((weight.data_ptr(), weight._version, weight.dtype) for weight in sources)
        if self._input_gates_cache is None or self._input_gates_cache[0] != key:
            table = torch.addmm(self.decoder.bias_ih_l0, self.tag_embeddings.weight, self.decoder.weight_ih_l0.T)
            self._input_gates_cache = (key, table)
        return self._input_gates_cache[1]

    def _recurrent_weights(self, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """Per layer `(weight_ih.T, bias_ih, weight_hh.T, bias_hh)` for `_decoder_step`, in the dtype that
        `config.decoder_matmul_dtype` asks for when the hardware runs it natively (converted once per decode).
        Layer 0 gets `(None, None, ...)`: its input gates come from `_tag_input_gates`."""
        dtype = self.decoder.weight_hh_l0.dtype
        if self.config.decoder_matmul_dtype == "bfloat16" and runs_bfloat16_natively(device):
            dtype = torch.bfloat16

        def weight(name: str, layer: int) -> torch.Tensor:
            return getattr(self.decoder, f"{name}_l{layer}").to(dtype)

        layers = []
        for layer in range(self.config.decoder_num_layers):
            input_weights = (weight("weight_ih", layer).T, weight("bias_ih", layer)) if layer else (None, None)
            layers.append((*input_weights, weight("weight_hh", layer).T, weight("bias_hh", layer)))
        return layers

    def _decoder_step(self, tokens, state, input_gates, weights):
        """One GRU/LSTM step for a batch, the cell equations of `torch.nn.GRU`/`LSTM` written out, with layer 0's
        input gates looked up in `input_gates` (`_tag_input_gates`). `weights`: from `_recurrent_weights`; the gate
        arithmetic runs in the state's dtype whatever the matmuls ran in."""
        lstm = self.config.decoder_type == "lstm"
        hidden, cell = state if lstm else (state, None)
        hiddens, cells, layer_output = [], [], None
        for layer, (weight_ih, bias_ih, weight_hh, bias_hh) in enumerate(weights):
            if layer == 0:
                input_part = input_gates[tokens]
            else:
                input_part = torch.addmm(bias_ih, layer_output.to(weight_ih.dtype), weight_ih).to(hidden.dtype)
            hidden_part = torch.addmm(bias_hh, hidden[layer].to(weight_hh.dtype), weight_hh).to(hidden.dtype)
            if lstm:
                input_gate, forget_gate, candidate, output_gate = (input_part + hidden_part).chunk(4, 1)
                new_cell = forget_gate.sigmoid() * cell[layer] + input_gate.sigmoid() * fast_tanh(candidate)
                layer_output = output_gate.sigmoid() * fast_tanh(new_cell)
                cells.append(new_cell)
            else:
                input_reset, input_update, input_new = input_part.chunk(3, 1)
                hidden_reset, hidden_update, hidden_new = hidden_part.chunk(3, 1)
                reset = (input_reset + hidden_reset).sigmoid()
                update = (input_update + hidden_update).sigmoid()
                new = fast_tanh(input_new + reset * hidden_new)
                layer_output = new + update * (hidden[layer] - new)
            hiddens.append(layer_output)
        hidden = torch.stack(hiddens)
        return layer_output, ((hidden, torch.stack(cells)) if lstm else hidden)

    def _next_tag_log_probs(self, tokens, state, banned, input_gates, weights):
        output, state = self._decoder_step(tokens, state, input_gates, weights)
        logits = self.tag_classifier(output).float().masked_fill(banned, float("-inf"))
        return logits.log_softmax(-1), state

    def _decoding_start(self, image_embeds: torch.Tensor):
        """`(initial state, step)` for `generate_tags`, `step(tokens, state, banned) -> (log_probs, state)`."""
        step = partial(
            self._next_tag_log_probs,
            input_gates=self._tag_input_gates(),
            weights=self._recurrent_weights(image_embeds.device),
        )
        return self._initial_decoder_state(image_embeds), step


def area_weights(size: int, new_size: int) -> torch.Tensor:
    """`(new_size, size)`: row i averages the input pixels under output pixel i, a pixel it covers in part weighed
    by the part covered (a box filter)."""
    scale = size / new_size
    starts = torch.arange(new_size, dtype=torch.float64)[:, None] * scale
    pixels = torch.arange(size, dtype=torch.float64)[None]
    covered = (torch.minimum(starts + scale, pixels + 1) - torch.maximum(starts, pixels)).clamp(min=0)
    return (covered / scale).float()


def area_resize(pixel_values: torch.Tensor, size: tuple[int, int], input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """`(batch, channels, *size)` box-filtered from `pixel_values`: an average pool where the sizes divide, else two
    products with fixed weight matrices, which export to ONNX for any ratio (such as 384x288 -> 160x120), where an
    adaptive average pool (`F.interpolate`'s "area") exports only for whole-number ones. `input_size`, when given,
    is `pixel_values`' height and width as plain numbers: an ONNX export then reads them as constants."""
    height, width = input_size or pixel_values.shape[-2:]
    if height % size[0] == 0 and width % size[1] == 0:
        return F.avg_pool2d(pixel_values, (height // size[0], width // size[1]))
    rows = area_weights(height, size[0]).to(pixel_values)
    columns = area_weights(width, size[1]).to(pixel_values)
    return rows @ pixel_values @ columns.T


def mean_of_probabilities(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log(mean(exp(x))) over a list of log-probability tensors: the log of the averaged distribution."""
    return torch.stack(log_probs).logsumexp(0) - math.log(len(log_probs))


class FashionTaggerEnsembleModel(FashionTaggerPreTrainedModel):
    """Trained fashion taggers combined: the average of their head probabilities and, step by step, of their
    next-tag probabilities, so the decoder's tags follow the averaged heads. With `config.mirror_views` each member
    also sees the mirror image of every photo. Inference only: train the members, then combine them
    (`train/ensemble.py`).

    With more than one of `config.domains` (e.g. catalogue photos and the phone photos people upload), a linear
    gate on the general members' embeddings weighs each domain per photo, a mixture of experts (Jacobs et al.,
    1991) with a fixed gate: the answer is the gate-weighted average of each domain's averaged probabilities, and an
    expert domain's members run only on photos that give it at least `config.expert_min_weight`.

    `image_embeds` are `(batch, views, embed_dim)`: member by member, the photo then (with mirroring) its mirror;
    zeros for an expert's views of a photo the gate kept from it.
    """

    config_class = FashionTaggerEnsembleConfig

    def __init__(self, config: FashionTaggerEnsembleConfig):
        super().__init__(config)
        self.members = nn.ModuleList(FashionTaggerModel(member) for member in config.member_configs())
        widths = {encoder_output_width(member.encoder) for member in self.members}
        if len(widths) > 1:
            raise ValueError(f"ensemble members must pool to one embedding width, got {sorted(widths)}")
        width = widths.pop()
        self.gate = nn.Linear(width, len(config.domains)) if len(config.domains) > 1 else None
        self._add_ood_detector(width)
        self.post_init()

    def _init_weights(self, module):
        pass  # each member initialised itself, the gate is fitted (`training.domain_gate`): built from trained parts

    @property
    def views_per_member(self) -> int:
        return 2 if self.config.mirror_views else 1

    def view_members(self) -> list[FashionTaggerModel]:
        """The member that reads each view of `image_embeds` (`(batch, views, width)`), in order."""
        return [member for member in self.members for _ in range(self.views_per_member)]

    def domain_views(self) -> list[list[int]]:
        """Per domain, the indices of its members' views in `image_embeds`."""
        views = self.views_per_member
        return [
            [index * views + view for index in self.config.members_of(domain) for view in range(views)]
            for domain in self.config.domains
        ]

    def domain_weights(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, domains)` weights summing to one: the gate's probabilities on the mean of the general members'
        views, with expert domains under `config.expert_min_weight` set to zero. All ones for a single domain."""
        if self.gate is None:
            return image_embeds.new_ones(image_embeds.shape[0], 1, dtype=torch.float32)
        return self._gate_weights(image_embeds[:, self.domain_views()[0]])

    def ood_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_embeds[:, self.domain_views()[0]].float().mean(1), dim=-1)  # every photo has the gate's input

    def _gate_weights(self, general_views: torch.Tensor) -> torch.Tensor:
        weights = self.gate(general_views.mean(1).to(self.gate.weight.dtype)).float().softmax(-1)
        experts = weights[:, 1:]
        weights = torch.cat([weights[:, :1], experts.masked_fill(experts < self.config.expert_min_weight, 0.0)], 1)
        return weights / weights.sum(-1, keepdim=True)

    def member_pixel_values(self, index: int, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` at member `index`'s own input size. The processor makes the largest member's size; a
        member trained smaller gets it reduced by area averaging."""
        size = self.members[index].config.image_size
        if size == self.config.image_size:  # the configs, not the tensor's shape: static when exported to ONNX
            return pixel_values
        return area_resize(pixel_values, tuple(size), tuple(self.config.image_size))

    def encode_member_views(self, index: int, pixel_values: torch.Tensor) -> torch.Tensor:
        """Member `index`'s embeddings of each view of each photo, `(views, batch, width)`: one encoder call."""
        pixel_values = self.member_pixel_values(index, pixel_values)
        views = [pixel_values, pixel_values.flip(-1)] if self.config.mirror_views else [pixel_values]
        return self.members[index].encode_images(torch.cat(views)).view(len(views), pixel_values.shape[0], -1)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        general_members = self.config.members_of(self.config.domains[0])
        embeds = {index: self.encode_member_views(index, pixel_values) for index in general_members}
        if self.gate is not None:
            general = torch.cat([embeds[index] for index in general_members]).transpose(0, 1)
            general_weights = self._gate_weights(general)
            for domain_index, domain in enumerate(self.config.domains[1:], start=1):
                rows = general_weights[:, domain_index] > 0
                for index in self.config.members_of(domain):
                    member_embeds = general.new_zeros(self.views_per_member, *general.shape[::2])
                    if rows.any():
                        member_embeds[:, rows] = self.encode_member_views(index, pixel_values[rows]).to(member_embeds.dtype)
                    embeds[index] = member_embeds
        return torch.cat([embeds[index] for index in range(len(self.members))]).transpose(0, 1)

    def domain_attribute_log_probs(self, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute -> `(domains, batch, C)`: each domain's averaged head probabilities, as logs, before
        calibration (what it is fitted on); `forward` mixes them by `domain_weights`."""
        per_view = [
            member(image_embeds=image_embeds[:, view]).attribute_logits
            for view, member in enumerate(self.view_members())
        ]
        return {
            name: self.domain_log_probs([logits[name].float().log_softmax(-1) for logits in per_view])
            for name in self.config.attributes
        }

    def domain_log_probs(self, per_view_log_probs: list[torch.Tensor], domain_views: list[list[int]] | None = None) -> torch.Tensor:
        """`(domains, batch, C)`: per domain, the log of its members' views' averaged probabilities. `domain_views`
        (default `self.domain_views()`) indexes `per_view_log_probs` per domain."""
        domain_views = self.domain_views() if domain_views is None else domain_views
        return torch.stack([mean_of_probabilities([per_view_log_probs[view] for view in views]) for views in domain_views])

    def _mix(self, per_domain: torch.Tensor, log_weights: torch.Tensor, temperatures: list[float] | None = None) -> torch.Tensor:
        """log of the `log_weights`-weighted (`(batch, domains)`) average of each domain's probabilities, each
        domain's first divided by its temperature."""
        if temperatures is not None and any(temperature != 1.0 for temperature in temperatures):
            per_domain = (per_domain / per_domain.new_tensor(temperatures)[:, None, None]).log_softmax(-1)
        return (per_domain + log_weights.T[..., None]).logsumexp(0)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        attribute_labels: torch.Tensor | None = None,
        tag_ids: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        calibrated: bool = True,
        **kwargs,
    ) -> FashionTaggerOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Images from [`FashionTaggerImageProcessor`]. Not needed when `image_embeds` (from `encode_images`) are given.

        `attribute_logits` are the log of the averaged probabilities: their softmax is that average. With
        `config.attribute_temperatures`, each domain's averaged probabilities are first temperature-scaled, and with
        `config.label_hierarchy` a head answers from its finer head (unless `calibrated=False`).
        """
        if attribute_labels is not None or tag_ids is not None:
            raise ValueError("an ensemble is not trained: train its members, then combine them (train/ensemble.py)")
        image_embeds = self._image_embeds(pixel_values, image_embeds)
        log_weights = self.domain_weights(image_embeds).log()
        attribute_logits = {
            name: self._mix(per_domain, log_weights, self.config.temperatures(name) if calibrated else None)
            for name, per_domain in self.domain_attribute_log_probs(image_embeds).items()
        }
        if calibrated:
            attribute_logits = follow_label_hierarchy(attribute_logits, self.config)
        return FashionTaggerOutput(attribute_logits=attribute_logits, image_embeds=image_embeds)

    def _decoding_start(self, image_embeds: torch.Tensor):
        weights = self.domain_weights(image_embeds)
        # A domain that no photo of the batch weighs (the gate kept its experts from all of them) would add nothing
        # to the mix: its members' decoders do not run. On catalogue photos that halves the decoding.
        domains = [index for index in range(weights.shape[1]) if weights[:, index].any()]
        views = [self.domain_views()[index] for index in domains]
        decoded_views = [view for domain_views in views for view in domain_views]
        members = self.view_members()
        states, steps = [], []
        for view in decoded_views:
            state, step = members[view]._decoding_start(image_embeds[:, view])
            states.append(state)
            steps.append(step)
        position = {view: index for index, view in enumerate(decoded_views)}
        positions = [[position[view] for view in domain_views] for domain_views in views]
        # The weights travel with the states as `(1, batch, domains)`, so that beam search reorders their rows too.
        log_weights = weights[:, domains].log()[None]

        def step(tokens, states, banned):
            *member_states, log_weights = states
            log_probs, member_states = zip(*(member_step(tokens, state, banned) for member_step, state in zip(steps, member_states)))
            return self._mix(self.domain_log_probs(list(log_probs), positions), log_weights[0]), [*member_states, log_weights]

        return [*states, log_weights], step


__all__ = ["FashionTaggerEnsembleModel", "FoldedTagger", "FashionTaggerModel", "FashionTaggerOutput", "FashionTaggerPreTrainedModel"]
