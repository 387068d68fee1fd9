"""Cleaning pretraining text at prepare time: normalisation, filters, exact and near deduplication.

Each document goes through these steps, in this order (`data.*` keys in configs/base.py turn each
one off; `data.clean=False` turns them all off, and the prepared data are then the files' text as
it was before cleaning existed):

1. normalise: Unicode NFC (`data.clean_nfc`), then drop control characters other than newline and
   tab (`data.clean_control`; carriage returns go too, so CRLF text becomes LF text);
2. filters: fewer than `data.min_chars` or more than `data.max_chars` characters, a share of
   U+FFFD replacement characters above `data.max_replacement_share` (a binary file read as text),
   a line longer than `data.max_line_chars`;
3. exact duplicates: the same normalised text as a document already kept (SHA-256);
4. near duplicates: MinHash of word shingles (`data.dedup_shingle` words, `data.dedup_num_perm`
   permutations, datasketch), candidates from LSH, removed when the estimated Jaccard similarity
   with a kept document is at least `data.dedup_near`.

Documents are seen validation split first, then train, each in sorted key order, and the first of
a group of duplicates is the one kept: a training document that repeats a validation document is
removed from training, so the two splits never share a text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
from typing import TYPE_CHECKING

from jaxlm.config import DataConfig

if TYPE_CHECKING:
    from datasketch import MinHash

REPLACEMENT = "\ufffd"
# What each step removed (or, for the two normalisations, changed), as written to the summary.
COUNT_KEYS = ("nfc_changed", "control_chars_removed_from", "too_short_removed", "too_long_removed",
              "replacement_chars_removed", "long_line_removed", "exact_duplicates_removed",
              "near_duplicates_removed")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The cleaning steps a prepare runs; `off()` runs none."""

    nfc: bool = False
    control: bool = False
    min_chars: int = 0
    max_chars: int = 0
    max_replacement_share: float = 1.0
    max_line_chars: int = 0
    exact: bool = False
    near: float = 0.0
    num_perm: int = 128
    shingle: int = 5

    @classmethod
    def off(cls) -> Settings:
        return cls()

    @classmethod
    def from_data(cls, d: DataConfig) -> Settings:
        if not d.clean:
            return cls.off()
        return cls(nfc=d.clean_nfc, control=d.clean_control, min_chars=d.min_chars,
                   max_chars=d.max_chars, max_replacement_share=d.max_replacement_share,
                   max_line_chars=d.max_line_chars, exact=d.dedup_exact, near=d.dedup_near,
                   num_perm=d.dedup_num_perm, shingle=d.dedup_shingle)

    def active(self) -> bool:
        return bool(self.nfc or self.control or self.min_chars or self.max_chars
                    or self.max_replacement_share < 1.0 or self.max_line_chars or self.exact
                    or self.near > 0)

    def tag(self) -> str:
        """'' when nothing runs (the prepared data are then what they were before cleaning), else
        'c' and a hash of the settings, so other settings never reuse a prepared copy."""
        if not self.active():
            return ""
        return "c" + hashlib.sha256(json.dumps(dataclasses.asdict(self)).encode()).hexdigest()[:8]


# Unicode's control characters (category Cc) are exactly U+0000-U+001F and U+007F-U+009F.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all of them but \t (09) and \n (0a)


class Cleaner:
    """Applies `Settings` to documents seen one at a time; `counts` says what each step did."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self._hashes: set[bytes] = set()
        # datasketch (and the scipy it imports, ~0.8 s) only when near duplicates are looked for:
        # every `jaxlm` command imports this module through datasets.py.
        self._lsh = None
        if settings.near > 0:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=settings.near, num_perm=settings.num_perm)
        self._kept: dict[int, MinHash] = {}

    def normalize(self, text: str, count: bool = True) -> str:
        """The text after the normalisation steps (NFC, control characters)."""
        s = self.settings
        if s.nfc:
            normal = unicodedata.normalize("NFC", text)
            if count and normal != text:
                self.counts["nfc_changed"] += 1
            text = normal
        if s.control:
            kept = _CONTROL.sub("", text)
            if count and len(kept) != len(text):
                self.counts["control_chars_removed_from"] += 1
            text = kept
        return text

    def admit(self, text: str) -> bool:
        """Whether a (normalised, non-empty) document is kept; a kept one is remembered, so a
        later duplicate of it is not."""
        reason = self._filtered(text)
        if reason is None and self.settings.exact:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            if digest in self._hashes:
                reason = "exact_duplicates_removed"
            else:
                self._hashes.add(digest)
        if reason is None and self._lsh is not None:
            reason = self._near_duplicate(text)
        if reason is not None:
            self.counts[reason] += 1
            return False
        return True

    def _filtered(self, text: str) -> str | None:
        s = self.settings
        if s.min_chars and len(text) < s.min_chars:
            return "too_short_removed"
        if s.max_chars and len(text) > s.max_chars:
            return "too_long_removed"
        if s.max_replacement_share < 1.0 and text.count(REPLACEMENT) > s.max_replacement_share * len(text):
            return "replacement_chars_removed"
        if s.max_line_chars and max(map(len, text.split("\n"))) > s.max_line_chars:
            return "long_line_removed"
        return None

    def _near_duplicate(self, text: str) -> str | None:
        words = text.split()
        n = self.settings.shingle
        shingles = {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass")
                    for i in range(max(1, len(words) - n + 1))}
        from datasketch import MinHash

        sketch = MinHash(num_perm=self.settings.num_perm)
        sketch.update_batch(sorted(shingles))
        if any(self._kept[k].jaccard(sketch) >= self.settings.near for k in self._lsh.query(sketch)):
            return "near_duplicates_removed"
        key = len(self._kept)
        self._lsh.insert(key, sketch)
        self._kept[key] = sketch
        return None
