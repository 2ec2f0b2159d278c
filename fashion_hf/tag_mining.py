"""Tag mining from product names: detail tags from a curated lexicon, kept as data, and the brand.

Myntra's names read "<brand> <gender> <description>" ("Puma Men Slim Fit Running Shoes"): the brand is the words
before the gender word, the detail tags are the lexicon's phrases found in the name. `fashion_hf.data` mines every
catalogue with these when it builds tag sequences and the vocabulary; typed feedback tags take their canonical
spelling from here too.

    >>> mine_detail_tags("Puma Men Slim Fit Running Shoes")
    ['slim fit', 'running']
    >>> extract_brand("Turtle Check Men Navy Blue Shirt")
    'Turtle Check'
"""

import re
from collections.abc import Mapping, Sequence

# Canonical detail tag -> other spellings that mean the same. Matching is whole-word and case-insensitive, spaces and
# hyphens are interchangeable ("V Neck" = "v-neck"), and the longest phrase wins ("non-padded" before "padded").
# Built from the words shoppers filter on in the product names of the train split. Words that an attribute head
# already predicts (colours, article types, usage such as "casual" or "formal", gender) are left out on purpose: a
# detail tag should say something the heads do not. The order here is the order of detail tags in every vocabulary.
DETAIL_LEXICON: dict[str, tuple[str, ...]] = {
    # pattern and finish
    "printed": ("print", "prints"),
    "solid": ("plain",),
    "check": ("checks", "checked", "chequered", "checkered", "gingham", "plaid", "tartan"),
    "striped": ("stripes", "stripe", "stripped", "pinstripe", "pinstriped", "pin stripe"),
    "graphic": ("graphics",),
    "floral": ("florals",),
    "polka dot": ("polka dots", "polka"),
    "logo": ("logos",),
    "colourblocked": ("colour blocked", "colorblocked", "color blocked", "colourblock", "colorblock"),
    "embroidered": ("embroidery",),
    "camouflage": ("camo",),
    "animal print": ("leopard print", "leopard", "zebra print"),
    "paisley": (),
    "abstract": (),
    "melange": ("heather",),
    "washed": ("stone washed", "stonewashed"),
    "sequinned": ("sequined", "sequins", "sequin"),
    "beaded": (),
    "metallic": (),
    "matte": ("matt",),
    "shimmer": ("shimmery", "glitter"),
    # material
    "cotton": (),
    "denim": (),
    "leather": ("genuine leather",),
    "faux leather": ("leatherette", "leatherite", "pu leather", "synthetic leather"),
    "suede": (),
    "canvas": (),
    "silk": (),
    "satin": (),
    "linen": (),
    "wool": ("woollen", "woolen"),
    "fleece": (),
    "knit": ("knitted", "knitwear"),
    "lace": (),
    "mesh": (),
    "chiffon": (),
    "georgette": (),
    "crepe": (),
    "chanderi": (),
    "sterling silver": (),
    "gold plated": (),
    "pearl": ("pearls",),
    "crystal": ("crystals",),
    # fit and rise
    "slim fit": ("slim",),
    "skinny": ("skinny fit",),
    "regular fit": (),
    "relaxed fit": ("loose fit",),
    "oversized": ("oversize",),
    "stretch": ("stretchable",),
    "low rise": (),
    "mid rise": (),
    "high rise": ("high waist", "high waisted"),
    # neck, sleeve, build
    "polo": ("polo neck",),
    "round neck": ("crew neck", "crewneck"),
    "v-neck": ("vneck",),
    "mandarin collar": ("mandarin", "chinese collar"),
    "hooded": ("hood", "hoodie"),
    "sleeveless": (),
    "short sleeve": ("short sleeves", "short sleeved", "half sleeve", "half sleeves", "half sleeved"),
    "full sleeve": ("full sleeves", "full sleeved", "long sleeve", "long sleeves", "long sleeved"),
    "reversible": (),
    # footwear
    "slip-on": ("slip ons",),
    "lace-up": ("lace ups", "laceup"),
    "peep toe": ("peep toes", "peeptoe"),
    "stiletto": ("stilettos",),
    "wedge": ("wedges",),
    "ballerina": ("ballerinas", "ballet flats"),
    # sport and activity
    "running": ("run",),
    "training": ("trainng", "trainer", "trainers"),
    "football": ("soccer",),
    "basketball": (),
    "tennis": (),
    "cricket": (),
    "badminton": (),
    "yoga": (),
    "swimming": ("swim",),
    "cycling": (),
    "golf": (),
    "hiking": ("trekking", "trek"),
    "outdoor": ("outdoors",),
    "skateboarding": ("skate", "skateboard"),
    "motorsport": ("motorsports",),
    # watches and eyewear
    "analog": ("analogue",),
    "digital": (),
    "chronograph": (),
    "multifunction": ("multi function",),
    "aviator": ("aviators",),
    "wayfarer": ("wayfarers",),
    "polarized": ("polarised",),
    "uv protection": ("uv protected", "uv"),
    # lingerie
    "padded": (),
    "non-padded": (),
    "push-up": (),
    "full coverage": (),
    "seamless": (),
    # how it is sold, occasion
    "multipack": ("pack of", "set of", "combo"),
    "gift set": ("gift pack", "gift box"),
    "wedding": ("bridal",),
    "vintage": ("retro",),
    "waterproof": ("water resistant",),
}

# Brands whose name holds a lexicon word but says nothing about the item ("U.S. Polo Assn." belts are not polos).
# The name is mined without them. Product lines that do describe the item ("Turtle Check" shirts) are not listed.
NON_DESCRIPTIVE_BRANDS = ("U.S. Polo Assn.", "U.S. Polo Assn. Denim Co.", "Regent Polo Club", "Classic Polo",
                          "Urban Yoga", "Denim")

# The word after the brand in a product name ("Puma Men Slim Fit Running Shoes"): brand = the words before it.
GENDER_WORDS = frozenset(
    {"men", "men's", "mens", "man", "man's", "women", "women's", "womens", "woman", "woman's", "ladies",
     "boys", "boy's", "boys'", "boy", "girls", "girl's", "girls'", "girl", "unisex",
     "kids", "kid's", "kids'", "kid", "kids-boys", "kids-girls", "infant", "infants", "teen", "teens"}
)
_TOKEN_PUNCTUATION = ".,;:()[]"


def brand_key(brand: str) -> str:
    """Case, spaces and dots do not distinguish brands: "U.S.Polo Assn", "U.S. Polo Assn." -> "uspoloassn"."""
    return re.sub(r"[\s.]+", "", brand.casefold())


_NON_DESCRIPTIVE_BRAND_KEYS = frozenset(map(brand_key, NON_DESCRIPTIVE_BRANDS))


def _phrase_key(text: str) -> str:
    """Case, spaces and hyphens do not distinguish phrases: "V-Neck", "v neck" -> "v neck"."""
    return " ".join(re.split(r"[\s\-]+", text.casefold().strip()))


def _compile_lexicon(lexicon: Mapping[str, Sequence[str]]) -> tuple[re.Pattern, dict[str, str]]:
    """One alternation, longest phrase first, so that the regex engine prefers "slim fit" to "slim"."""
    surface_to_tag = {}
    for tag, spellings in lexicon.items():
        for spelling in (tag, *spellings):
            surface_to_tag[_phrase_key(spelling)] = tag
    phrases = sorted(surface_to_tag, key=lambda phrase: (-len(phrase), phrase))
    alternation = "|".join(r"[\s\-]+".join(map(re.escape, phrase.split(" "))) for phrase in phrases)
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE), surface_to_tag


_DETAIL_PATTERN, _SURFACE_TO_TAG = _compile_lexicon(DETAIL_LEXICON)
_LEXICON_RANK = {tag: rank for rank, tag in enumerate(DETAIL_LEXICON)}


def detail_tag_order(tag: str) -> tuple[int, int, str]:
    """Sort key of detail tags: lexicon order first, then tags from elsewhere (feedback) alphabetically."""
    rank = _LEXICON_RANK.get(tag)
    return (0, rank, "") if rank is not None else (1, 0, tag)


def canonical_detail_tag(text: str) -> str:
    """A typed tag in canonical form: a lexicon spelling maps to its tag ("Checked" -> "check"), else lower case."""
    key = _phrase_key(text)
    return _SURFACE_TO_TAG.get(key, " ".join(text.casefold().split()))


def _split_brand(name: str, gender: str | None = None) -> tuple[str | None, str]:
    """(brand, rest of the name from the gender word on); (None, name) when no gender word is found."""
    words = GENDER_WORDS | {gender.casefold()} if gender else GENDER_WORDS
    tokens = name.split()
    for position, token in enumerate(tokens):
        if token.casefold().strip(_TOKEN_PUNCTUATION) in words:
            return " ".join(tokens[:position]) or None, " ".join(tokens[position:])
    return None, name


def extract_brand(name: str | None, gender: str | None = None) -> str | None:
    """The words of a product name before its gender word ("Turtle Check Men Navy Blue Shirt" -> "Turtle Check").

    Myntra names read "<brand> <gender> <description>". `gender` (the item's gender label) also counts as a gender
    word, for catalogues that spell it differently. Returns None when no gender word is found: a guess would put
    product words into the brand head.
    """
    return _split_brand(name, gender)[0] if name else None


def mine_detail_tags(name: str | None) -> list[str]:
    """Canonical detail tags found in a product name, in lexicon order.

    >>> mine_detail_tags("Puma Men Slim Fit Running Shoes")
    ['slim fit', 'running']
    """
    if not name:
        return []
    brand, rest = _split_brand(name)
    if brand is not None and brand_key(brand) in _NON_DESCRIPTIVE_BRAND_KEYS:
        name = rest
    found = {_SURFACE_TO_TAG[_phrase_key(match.group())] for match in _DETAIL_PATTERN.finditer(name)}
    return sorted(found, key=detail_tag_order)
