"""Keyword-category tables for bins (SPEC §5): the built-in demographic table (thesis Tables 4.7-4.9) and tables
read from YAML. Keywords match whole words, case-insensitively, with an optional plural ``s``/``es``."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["DEMOGRAPHIC_KEYWORDS", "KeywordTable", "DEMOGRAPHIC_TABLE"]


#: Thesis Tables 4.7 (age), 4.8 (gender) and 4.9 (race): attribute -> [(category, keywords)], in table order.
DEMOGRAPHIC_KEYWORDS: dict[str, list[tuple[str, list[str]]]] = {
    "age": [
        ("Childhood", ["teen", "child", "kid", "baby", "toddler", "infant", "adolescent", "youth", "teenager"]),
        ("Young Adults", ["adult", "young adult", "young", "grown-up"]),
        ("Middle Age", ["middle-aged", "sophisticated", "mature"]),
        ("Elderly", ["elderly", "old", "senior", "aged"]),
    ],
    "gender": [
        ("Male", ["male", "man", "masculine"]),
        ("Female", ["female", "woman", "feminine"]),
        ("Non-binary", ["gay", "lesbian", "LGBT", "non-binary", "queer"]),
    ],
    "race": [
        ("White", ["white", "european", "caucasian", "middle eastern"]),
        ("Black", ["black", "african"]),
        ("Asian", ["asian", "chinese", "japanese", "korean", "indian", "south asian", "east asian", "southeast asian"]),
        ("Latino", ["latino", "hispanic"]),
        ("Indigenous", ["indigenous", "native", "pacific island"]),
    ],
}


class KeywordTable:
    """Attributes, each with keyword categories; a text's bin is the product of its categories' indices.

    ``attributes``: ``{attribute: [(category, [keyword, ...]), ...]}``. With attributes of sizes ``n_1..n_a`` there
    are ``n_1 · … · n_a`` bins; bin ids are row-major over the attributes in the given order.
    """

    def __init__(self, attributes: Mapping[str, Sequence[tuple[str, Sequence[str]]]], *, name: str = "keyword table"):
        if not attributes:
            raise ValueError(f"{name}: needs at least one attribute")
        self.name = name
        self.attributes: dict[str, list[tuple[str, list[str]]]] = {}
        self._patterns: dict[str, list[re.Pattern[str]]] = {}
        for attribute, categories in attributes.items():
            categories = [(str(c), [str(k) for k in kws]) for c, kws in categories]
            if len(categories) < 1:
                raise ValueError(f"{name}: attribute {attribute!r} has no categories")
            for category, keywords in categories:
                if not keywords or any(not k.strip() for k in keywords):
                    raise ValueError(f"{name}: {attribute}/{category}: every category needs non-empty keywords")
            self.attributes[attribute] = categories
            self._patterns[attribute] = [
                re.compile(r"(?<![-\w])(?:" + "|".join(re.escape(k.lower()) for k in keywords) + r")(?:s|es)?\b")
                for _, keywords in categories
            ]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> "KeywordTable":
        """From ``{attribute: {category: [keywords]}}`` (e.g. a YAML file); errors name ``source``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a keyword table is a mapping attribute -> {{category: [keywords]}}")
        attributes = {}
        for attribute, categories in data.items():
            if not isinstance(categories, Mapping):
                raise ValueError(f"{source}: attribute {attribute!r} must map category names to keyword lists")
            attributes[str(attribute)] = [(str(c), list(k) if isinstance(k, (list, tuple)) else [k]) for c, k in categories.items()]
        return cls(attributes, name=source)

    @property
    def num_bins(self) -> int:
        return math.prod(len(c) for c in self.attributes.values())

    def bin_labels(self) -> list[str]:
        """Human-readable label of every bin id, e.g. ``"Childhood/Male/White"``."""
        labels = [""]
        for categories in self.attributes.values():
            labels = [f"{prefix}/{c}" if prefix else c for prefix in labels for c, _ in categories]
        return labels

    def categorize(self, text: str) -> dict[str, Optional[str]]:
        """``{attribute: category or None}``; the category whose keyword occurs first in the text wins."""
        lowered = text.lower()
        found: dict[str, Optional[str]] = {}
        for attribute, patterns in self._patterns.items():
            best: Optional[tuple[int, int]] = None
            for index, pattern in enumerate(patterns):
                match = pattern.search(lowered)
                if match and (best is None or match.start() < best[0]):
                    best = (match.start(), index)
            found[attribute] = None if best is None else self.attributes[attribute][best[1]][0]
        return found

    def bin_of(self, text: str) -> Optional[int]:
        """The bin id of a text, or None when some attribute has no keyword in it."""
        index = 0
        for attribute, category in self.categorize(text).items():
            if category is None:
                return None
            names = [c for c, _ in self.attributes[attribute]]
            index = index * len(names) + names.index(category)
        return index


DEMOGRAPHIC_TABLE = KeywordTable(DEMOGRAPHIC_KEYWORDS, name="demographic keyword table (thesis Tables 4.7-4.9)")
