"""Configuration of the fashion tagger: the encoder, the attribute heads, the tag decoder and every vocabulary."""

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Special tag-decoder tokens come first in the tag id space; real tags follow in vocabulary order.
SPECIAL_TAGS = ("<pad>", "<bos>", "<eos>")
PAD_TAG_ID, BOS_TAG_ID, EOS_TAG_ID = range(len(SPECIAL_TAGS))
DETAIL_GROUP = "detail"
IGNORE_INDEX = -100  # a missing attribute label: cross-entropy skips it

# A small but complete vocabulary so that `FashionTaggerConfig()` builds a working model, as every transformers
# config does. Trained models replace it with the vocabulary mined from their training data.
DEFAULT_ATTRIBUTES = {
    "gender": ["Boys", "Girls", "Men", "Unisex", "Women"],
    "masterCategory": ["Accessories", "Apparel", "Footwear", "Personal Care"],
    "articleType": ["Casual Shoes", "Handbags", "Jeans", "Shirts", "Tops", "Tshirts", "Watches"],
    "baseColour": ["Black", "Blue", "Brown", "Grey", "Navy Blue", "Red", "White"],
    "season": ["Fall", "Spring", "Summer", "Winter"],
    "usage": ["Casual", "Ethnic", "Formal", "Sports"],
}
DEFAULT_DETAIL_TAGS = ["check", "denim", "printed", "running", "slim fit", "solid", "striped"]
DEFAULT_FEEDBACK_TAG_MIN_CONTRIBUTORS = 3
DEFAULT_DOMAIN = "catalogue"  # the photos a model is trained on unless told otherwise: product catalogue photos
USER_PHOTOS_DOMAIN = "user-photos"  # the photos people upload to the app (phone photos), taught by their corrections


def registered_locally(config_class: type) -> bool:
    """Whether `config_class` is the class AutoConfig holds for its model type: the `fashion_hf` package's own,
    registered at its import, rather than a copy loaded from a model folder with trust_remote_code."""
    return config_class.model_type in CONFIG_MAPPING and CONFIG_MAPPING[config_class.model_type] is config_class


def tag_key(group: str, text: str) -> str:
    """The unique name of a tag: the same text can be a tag of two groups (subCategory and articleType "Watches")."""
    return f"{group}:{text}"


class FashionTaggerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`FashionTaggerModel`]: a timm CNN encoder, one linear head per product attribute, and a
    recurrent decoder that generates the item's tags from the image embedding.

    The config is the single source of truth for every vocabulary: the image processor, the pipeline, the training
    script and the app all read labels and tags from here.

    Args:
        encoder_name (`str`, *optional*, defaults to `"tf_efficientnet_lite0"`):
            timm architecture of the image encoder (built with `num_classes=0`).
        encoder_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`, e.g. `{"drop_path_rate": 0.1}`.
        image_size (`list[int]`, *optional*, defaults to `[128, 96]`):
            Input `[height, width]`. Product photos are 3:4 portraits, so the default keeps their aspect.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel normalisation mean (the `tf_efficientnet_lite0` ImageNet weights use 0.5).
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel normalisation standard deviation.
        attributes (`dict[str, list[str]]`, *optional*):
            Ordered mapping `attribute -> [label, ...]`, one classification head per attribute.
        tags (`list[list[str]]`, *optional*):
            Tag vocabulary as `[text, group]` pairs, group being an attribute name or `"detail"`. Defaults to every
            attribute label followed by a few detail tags.
        decoder_type (`str`, *optional*, defaults to `"gru"`):
            `"gru"` or `"lstm"`.
        decoder_hidden_size (`int`, *optional*, defaults to 512):
            Width of the recurrent decoder state.
        decoder_num_layers (`int`, *optional*, defaults to 1):
            Number of stacked recurrent layers.
        tag_embedding_size (`int`, *optional*, defaults to 256):
            Width of the tag embeddings fed to the decoder.
        max_tag_length (`int`, *optional*, defaults to 16):
            Most tags a generated sequence can hold; decoding always stops there.
        classifier_dropout (`float`, *optional*, defaults to 0.2):
            Dropout on the image embedding before the heads and the decoder.
        tag_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the decoder loss against the mean attribute loss.
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the attribute and tag cross-entropies.
        decoder_matmul_dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype of the decoder's recurrent matrix products in `generate_tags` (inference only; training and
            `forward` always use the model's dtype): `"float32"` or `"bfloat16"`. `"bfloat16"` runs them about 4x
            faster on hardware with native bf16 (CPUs with AVX512-BF16 or AMX, recent GPUs) and falls back to the
            model's dtype elsewhere; the tag classifier stays in the model's dtype, so scores and near-ties keep
            full precision. See `BENCHMARKS.md` for its effect on the shipped model's tags.
        feedback_tag_min_contributors (`int`, *optional*, defaults to 3):
            A detail tag typed into the app's feedback tab joins the tag vocabulary when training builds it
            (`train.py --feedback`) once at least this many people typed it, however rare it is among product
            names (`feedback.dataset.feedback_tag_contributors` says who counts as a person). Rarer typed tags are
            left out of the vocabulary and out of the training sequences; they stay in the feedback store and join
            in a later run once enough people type them. Older config.json files without it load with 3.
        attribute_temperatures (`dict[str, dict[str, float]]`, *optional*):
            Calibration (`fashion-hf calibrate`): per domain (a single model's only domain is `"catalogue"`), per
            head, the temperature its probabilities are divided by, `softmax(logits / T)`, fitted on held-out photos
            so that a 90% answer is right 90% of the time. A missing domain or head keeps its scores (T = 1).
        tag_score_scaling (`dict[str, list[float]]`, *optional*):
            Calibration: per tag group (an attribute or `"detail"`), `[a, b]` such that a generated tag's score is
            `sigmoid(a * logit(p) + b)` of the decoder's step probability `p` (Platt scaling, fitted on how often
            that group's tags were right). Decoding is unchanged; a group without an entry keeps `p`.
        confidence_thresholds (`dict[str, float]`, *optional*):
            Per head, the top-label score under which the pipeline marks the attribute "not sure" (`not_sure`);
            `fashion-hf calibrate` chooses each so that answers at or above it were right at least 95% of the time
            on held-out photos. A head without a threshold is never marked.
        ood_thresholds (`dict[str, float]`, *optional*):
            The out-of-distribution detector's limits, set with its statistics by `fashion-hf calibrate`: `distance`
            (of the photo's normalised embedding to the photos the model was trained on, a Mahalanobis distance),
            `uncertainty` (the summed entropy of the calibrated heads of `ood_uncertainty_heads`) and `turned` (the
            probability that the photo is on its side or upside down, from a linear probe of the embedding). A photo
            beyond any of them does not look like an upright clothing or accessory photo (`ood_scores`). None: no
            detector.
        ood_uncertainty_heads (`list[str]`, *optional*):
            The heads whose summed entropy is the detector's `uncertainty` signal, chosen by `fashion-hf calibrate`:
            the heads that say what the garment is. None: every head (models calibrated before the field existed).
        upright_search (`dict[str, float]`, *optional*):
            Photos that may be on their side or upside down, tagged the right way up: `below` is the upright
            probability (a four-way probe of the embedding, fitted by `fashion-hf calibrate`) under which the
            pipeline also encodes the photo turned by 90, 180 and 270 degrees, and `margin` how much more upright
            a turn must look to be tagged instead of the photo as given (`FashionTaggerPreTrainedModel.turn_upright`).
            Optional `flag_margin`: a photo left as given whose best turn looks more upright than it by more than
            this is flagged as turned (`ood_signals`' `turned`): it is neither surely upright nor surely turned.
            None: photos are tagged as given.
        label_hierarchy (`dict[str, dict]`, *optional*):
            Heads whose labels group a finer head's: `{"subCategory": {"from": "articleType", "parents": {"Dresses":
            {"Dress": 0.997, "Topwear": 0.003}, ...}}}`. Such a head answers with the finer head's probabilities
            summed into its groups, P(group) = sum over labels of P(label) P(group | label), the table counted on
            the training labels by `fashion-hf calibrate`; the two heads then agree. Probability on finer labels
            missing from the table keeps the head's own distribution.
        attribute_order (`list[str]`, *optional*):
            Head order of `attributes`; set automatically, since `config.json` is written with sorted keys.

    Example:

    ```python
    >>> from fashion_hf import FashionTaggerConfig, FashionTaggerModel
    >>> config = FashionTaggerConfig(attributes={"articleType": ["Shirts", "Tshirts"]}, decoder_type="lstm")
    >>> model = FashionTaggerModel(config)
    ```
    """

    model_type = "fashion-tagger"

    def __init__(
        self,
        encoder_name: str = "tf_efficientnet_lite0",
        encoder_kwargs: dict | None = None,
        image_size: list[int] | tuple[int, int] = (128, 96),
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        attributes: dict[str, list[str]] | None = None,
        tags: list[list[str]] | None = None,
        decoder_type: str = "gru",
        decoder_hidden_size: int = 512,
        decoder_num_layers: int = 1,
        tag_embedding_size: int = 256,
        max_tag_length: int = 16,
        classifier_dropout: float = 0.2,
        tag_loss_weight: float = 1.0,
        label_smoothing: float = 0.0,
        decoder_matmul_dtype: str = "float32",
        feedback_tag_min_contributors: int = DEFAULT_FEEDBACK_TAG_MIN_CONTRIBUTORS,
        attribute_temperatures: dict[str, dict[str, float]] | None = None,
        tag_score_scaling: dict[str, list[float]] | None = None,
        confidence_thresholds: dict[str, float] | None = None,
        ood_thresholds: dict[str, float] | None = None,
        ood_uncertainty_heads: list[str] | None = None,
        upright_search: dict[str, float] | None = None,
        label_hierarchy: dict[str, dict] | None = None,
        attribute_order: list[str] | None = None,
        **kwargs,
    ):
        if decoder_type not in ("gru", "lstm"):
            raise ValueError(f"decoder_type must be 'gru' or 'lstm', got {decoder_type!r}")
        if decoder_matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"decoder_matmul_dtype must be 'float32' or 'bfloat16', got {decoder_matmul_dtype!r}")
        if not isinstance(feedback_tag_min_contributors, int) or feedback_tag_min_contributors < 1:
            minimum = feedback_tag_min_contributors
            raise ValueError(f"feedback_tag_min_contributors must be a whole number >= 1, got {minimum!r}")
        attributes = {name: list(labels) for name, labels in (attributes or DEFAULT_ATTRIBUTES).items()}
        if attribute_order is not None:  # config.json is written with sorted keys; the head order travels here
            attributes = {name: attributes[name] for name in attribute_order}
        for name, labels in attributes.items():
            if not labels or len(set(labels)) != len(labels):
                raise ValueError(f"attribute {name!r} needs a non-empty list of distinct labels, got {labels!r}")
        if tags is None:
            tags = [[label, name] for name, labels in attributes.items() for label in labels]
            tags += [[text, DETAIL_GROUP] for text in DEFAULT_DETAIL_TAGS]
        tags = [list(pair) for pair in tags]
        keys = [tag_key(group, text) for text, group in tags]
        if len(set(keys)) != len(keys):
            raise ValueError("the tag vocabulary holds the same [text, group] pair twice")

        self.encoder_name = encoder_name
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.image_size = list(image_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.attributes = attributes
        self.attribute_order = list(attributes)
        self.tags = tags
        self.decoder_type = decoder_type
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_layers = decoder_num_layers
        self.tag_embedding_size = tag_embedding_size
        self.max_tag_length = max_tag_length
        self.classifier_dropout = classifier_dropout
        self.tag_loss_weight = tag_loss_weight
        self.label_smoothing = label_smoothing
        self.decoder_matmul_dtype = decoder_matmul_dtype
        self.feedback_tag_min_contributors = feedback_tag_min_contributors
        self.attribute_temperatures = {domain: dict(heads) for domain, heads in (attribute_temperatures or {}).items()}
        self.tag_score_scaling = {group: list(scaling) for group, scaling in (tag_score_scaling or {}).items()}
        self.confidence_thresholds = dict(confidence_thresholds or {})
        self.ood_thresholds = dict(ood_thresholds) if ood_thresholds else None
        self.ood_uncertainty_heads = list(ood_uncertainty_heads) if ood_uncertainty_heads else None
        self.upright_search = dict(upright_search) if upright_search else None
        self.label_hierarchy = {name: dict(link) for name, link in (label_hierarchy or {}).items()}
        self._check_calibration()
        if registered_locally(type(self)):
            # A saved folder names its pipeline in `custom_pipelines` for trust_remote_code users, and transformers
            # then refuses that task without trust_remote_code, even where this package registers it. Loaded by
            # this package's own classes, the folder is served by the registered pipeline; saving through the
            # pipeline (`save_tagger`) writes the entry again.
            kwargs.pop("custom_pipelines", None)
        super().__init__(**kwargs)

    def _check_calibration(self) -> None:
        for domain, heads in self.attribute_temperatures.items():
            for name, temperature in heads.items():
                if name not in self.attributes or not temperature > 0:
                    raise ValueError(f"attribute_temperatures[{domain!r}][{name!r}] = {temperature!r}: a head's temperature is > 0")
        for name, threshold in self.confidence_thresholds.items():
            if name not in self.attributes or not 0.0 <= threshold <= 1.0:
                raise ValueError(f"confidence_thresholds[{name!r}] = {threshold!r}: a head's threshold is in [0, 1]")
        if self.ood_thresholds is not None and sorted(self.ood_thresholds) != sorted(OOD_LIMITS):
            raise ValueError(f"ood_thresholds has the limits {list(OOD_LIMITS)}, got {self.ood_thresholds!r}")
        if self.ood_uncertainty_heads is not None and not set(self.ood_uncertainty_heads) <= set(self.attributes):
            raise ValueError(f"ood_uncertainty_heads names heads of `attributes`, got {self.ood_uncertainty_heads!r}")
        if self.upright_search is not None and not (
            {"below", "margin"} <= set(self.upright_search) <= {"below", "margin", "flag_margin"}
            and 0 < self.upright_search.get("flag_margin", 1.0) <= 1.0
        ):
            raise ValueError(
                f"upright_search is {{'below': ..., 'margin': ...}}, with an optional 'flag_margin' in (0, 1], "
                f"got {self.upright_search!r}"
            )
        for name, link in self.label_hierarchy.items():
            finer = link.get("from")
            if name not in self.attributes or finer not in self.attributes or finer == name:
                raise ValueError(f"label_hierarchy[{name!r}] groups another head's labels, got {link!r}")
            for label, groups in link.get("parents", {}).items():
                if label not in self.attributes[finer] or not set(groups) <= set(self.attributes[name]):
                    raise ValueError(f"label_hierarchy[{name!r}]: {label!r} -> {groups!r} is not {finer} -> {name} labels")
        for group, scaling in self.tag_score_scaling.items():
            if len(scaling) != 2:
                raise ValueError(f"tag_score_scaling[{group!r}] is [a, b], got {scaling!r}")

    def photo_domains(self) -> list[str]:
        """The kinds of photo the model tells apart: a single model knows one, an ensemble its `domains`."""
        return getattr(self, "domains", None) or [DEFAULT_DOMAIN]

    def temperatures(self, name: str) -> list[float]:
        """Head `name`'s temperature in each of `photo_domains()`, 1.0 where it is not calibrated."""
        return [self.attribute_temperatures.get(domain, {}).get(name, 1.0) for domain in self.photo_domains()]

    def is_not_sure(self, name: str, score: float) -> bool:
        """Whether head `name`'s top-label `score` is under its confidence threshold (never, for a head without one)."""
        return score < self.confidence_thresholds.get(name, 0.0)

    def without_calibration(self) -> None:
        """Forget every fitted calibration value: they belong to these weights, and training changes them."""
        self.attribute_temperatures, self.tag_score_scaling, self.confidence_thresholds = {}, {}, {}
        self.ood_thresholds = self.ood_uncertainty_heads = self.upright_search = None
        self.label_hierarchy = {}

    @property
    def encoder_description(self) -> str:
        return self.encoder_name

    @property
    def tag_vocab_size(self) -> int:
        return len(SPECIAL_TAGS) + len(self.tags)

    def tag_to_id(self) -> dict[str, int]:
        """Tag key (`"group:text"`) -> decoder token id."""
        return {tag_key(group, text): index + len(SPECIAL_TAGS) for index, (text, group) in enumerate(self.tags)}

    def attribute_label_ids(self, values) -> list[int]:
        """`{attribute: label}` -> one label index per head in head order; -100 where missing or out of vocabulary."""
        ids = []
        for name, labels in self.attributes.items():
            value = values.get(name)
            ids.append(labels.index(value) if value in labels else IGNORE_INDEX)
        return ids

    def tag_sequence_ids(self, keys, vocabulary: dict[str, int] | None = None) -> list[int]:
        """Tag keys -> `<bos> tag ... <eos>` ids for teacher forcing; keys outside the vocabulary are dropped.

        `vocabulary`: `tag_to_id()` built once by a caller that encodes many sequences (a data loader).
        """
        vocabulary = vocabulary if vocabulary is not None else self.tag_to_id()
        return [BOS_TAG_ID] + [vocabulary[key] for key in keys if key in vocabulary] + [EOS_TAG_ID]

    def id_to_tag(self, tag_id: int) -> tuple[str, str]:
        """Decoder token id -> `(text, group)`."""
        text, group = self.tags[tag_id - len(SPECIAL_TAGS)]
        return text, group


ENSEMBLE_FIELDS = ("members", "mirror_views", "domains", "member_domains", "expert_min_weight")
# Fitted to one model's weights by `fashion-hf calibrate`: a member or a retrained model does not inherit them.
CALIBRATION_FIELDS = (
    "attribute_temperatures", "tag_score_scaling", "confidence_thresholds", "ood_thresholds", "ood_uncertainty_heads",
    "upright_search", "label_hierarchy",
)
OOD_LIMITS = ("distance", "uncertainty", "turned")
# The turns `upright_search` tries, counter-clockwise as PIL's `Image.rotate` turns (90 undoes a photo turned by 270).
QUARTER_TURNS = (90, 180, 270)


def largest_image_size(sizes: list[list[int]]) -> list[int]:
    """The `(height, width)` of most pixels among `sizes`; every other must fit inside it with the same aspect, so
    that reducing the larger input gives each member the photo it was trained on (`image_size` of an ensemble)."""
    largest = list(max(sizes, key=lambda size: size[0] * size[1]))
    for size in sizes:
        if size[0] > largest[0] or size[1] > largest[1] or size[0] * largest[1] != size[1] * largest[0]:
            raise ValueError(f"ensemble members' input sizes must share one aspect ratio; got {sizes}")
    return largest


def _shared_fields(config: FashionTaggerConfig) -> dict:
    """The config's fields, without those that name its class or the members, to build another config from."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", *ENSEMBLE_FIELDS, *CALIBRATION_FIELDS):
        fields.pop(key, None)
    return fields


class FashionTaggerEnsembleConfig(FashionTaggerConfig):
    r"""
    Configuration of a [`FashionTaggerEnsembleModel`]: several fashion taggers trained on the same vocabulary, whose
    head probabilities and next-tag probabilities are averaged (optionally over each photo and its mirror image).

    The vocabularies and normalisation are shared and live at the top level as in [`FashionTaggerConfig`]; each
    member differs in its architecture and may differ in its input size. The top-level `image_size` is the largest
    member's, what the image processor makes; a member trained smaller sees each photo reduced to its own size.

    Args:
        members (`list[dict]`):
            Per member, the architecture fields of its [`FashionTaggerConfig`] (`MEMBER_FIELDS`); the rest of the
            member's config is this one's.
        mirror_views (`bool`, *optional*, defaults to `True`):
            Also run every member on the left-right mirror of each photo and average that view in.
        domains (`list[str]`, *optional*, defaults to `["catalogue"]`):
            The kinds of photo the ensemble tells apart, e.g. `["catalogue", "user-photos"]`. The first is the
            general one: its members see every photo, and a linear gate on their embeddings weighs the domains per
            photo. The members of the other domains are experts: trained on their kind of photo, they are run only
            on photos the gate gives them weight, so that a catalogue photo gets the general members' answer.
        member_domains (`list[str]`, *optional*):
            The domain of each member, in member order; every member belongs to the first domain by default.
        expert_min_weight (`float`, *optional*, defaults to `0.01`):
            A photo whose gate weight for an expert domain is below this skips that domain's members (their share
            goes to the other domains): catalogue photos cost no expert encoder pass.
        kwargs:
            The shared fields of [`FashionTaggerConfig`]; its architecture fields describe the first member.
    """

    model_type = "fashion-tagger-ensemble"
    MEMBER_FIELDS = ("encoder_name", "encoder_kwargs", "decoder_type", "decoder_hidden_size", "decoder_num_layers",
                     "tag_embedding_size", "image_size")  # fmt: skip

    def __init__(
        self,
        members: list[dict] | None = None,
        mirror_views: bool = True,
        domains: list[str] | None = None,
        member_domains: list[str] | None = None,
        expert_min_weight: float = 0.01,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if members is None:  # a loadable default, as every transformers config has one
            members = [{field: getattr(self, field) for field in self.MEMBER_FIELDS}]
        if not members:
            raise ValueError("an ensemble needs at least one member")
        unknown = {field for member in members for field in member} - set(self.MEMBER_FIELDS)
        if unknown:
            raise ValueError(f"ensemble members set only {list(self.MEMBER_FIELDS)}, not {sorted(unknown)}")
        self.members = [dict(member) for member in members]
        self.mirror_views = mirror_views
        self.domains = list(domains or [DEFAULT_DOMAIN])
        self.member_domains = list(member_domains or [self.domains[0]] * len(members))
        self.expert_min_weight = expert_min_weight
        self._check_domains()

    def _check_domains(self) -> None:
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct, got {self.domains}")
        if len(self.member_domains) != len(self.members):
            raise ValueError(f"member_domains has {len(self.member_domains)} entries for {len(self.members)} members")
        unknown = sorted(set(self.member_domains) - set(self.domains))
        if unknown:
            raise ValueError(f"member_domains {unknown} are not among the domains {self.domains}")
        empty = [domain for domain in self.domains if domain not in self.member_domains]
        if empty:
            raise ValueError(f"every domain needs at least one member; {empty} have none")
        if not 0.0 <= self.expert_min_weight < 1.0:
            raise ValueError(f"expert_min_weight must be in [0, 1), got {self.expert_min_weight}")

    def members_of(self, domain: str) -> list[int]:
        """Indices of the members that serve `domain`."""
        return [index for index, member_domain in enumerate(self.member_domains) if member_domain == domain]

    def member_configs(self) -> list[FashionTaggerConfig]:
        shared = _shared_fields(self)
        return [FashionTaggerConfig(**{**shared, **member}) for member in self.members]

    @classmethod
    def from_members(
        cls, configs: list[FashionTaggerConfig], mirror_views: bool = True, **domain_fields
    ) -> "FashionTaggerEnsembleConfig":
        """The ensemble of models with these configs; they must share every vocabulary and the input format.
        `domain_fields`: `domains`, `member_domains` and `expert_min_weight`, for an ensemble with experts."""
        first = configs[0]
        for config in configs[1:]:
            for field in ("attributes", "tags", "image_mean", "image_std"):
                if getattr(config, field) != getattr(first, field):
                    raise ValueError(f"ensemble members must share {field}; {config.encoder_name}'s differs")
        shared = _shared_fields(first)
        shared["image_size"] = largest_image_size([config.image_size for config in configs])
        members = [{field: getattr(config, field) for field in cls.MEMBER_FIELDS} for config in configs]
        return cls(members=members, mirror_views=mirror_views, **shared, **domain_fields)

    @property
    def encoder_description(self) -> str:
        def described_member(member: dict) -> str:  # the input size where it is not the first member's
            size = member.get("image_size", self.image_size)
            first = self.members[0].get("image_size", self.image_size)
            return member["encoder_name"] + ("" if size == first else f" at {size[0]}x{size[1]}")

        def names(indices):
            return " + ".join(described_member(self.members[index]) for index in indices)

        described = names(self.members_of(self.domains[0]))
        for domain in self.domains[1:]:
            described += f"; {domain} experts: {names(self.members_of(domain))}"
        return f"{described}{', with mirrored photos' if self.mirror_views else ''}"


__all__ = ["FashionTaggerConfig", "FashionTaggerEnsembleConfig", "tag_key"]
