"""DataReport: what happened to every row of a recipe, per source, from file to training example."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import DataError


@dataclass
class SourceReport:
    """Load-time counts of one recipe source.

    ``rows``: rows read (bad ones included); ``bad``: malformed rows per reason; ``valid``:
    rows that became conversations; ``selected``: after ``samples``; ``train`` + ``held_out`` +
    ``held_out_near_duplicates`` = ``selected`` (held-out conversations sharing a normalised turn
    with training are dropped). ``tokenize_dropped``: conversations of this source dropped while
    tokenising, per reason (filled by ``build_dataset``)."""

    name: str
    path: str
    format: str
    files: int = 0
    rows: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    valid: int = 0
    selected: int = 0
    train: int = 0
    held_out: int = 0
    held_out_near_duplicates: int = 0
    tokenized: int = 0
    tokenize_dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # of the examples kept (train + held-out)
    supervised_tokens: int = 0

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def bad_fraction(self) -> float:
        """Share of this source's rows that do not become a training example: malformed at load
        time, or (estimated on the selected rows) dropped while tokenising."""
        if self.rows == 0:
            return 0.0
        usable = self.valid / self.rows
        if self.tokenized:
            usable *= 1.0 - sum(self.tokenize_dropped.values()) / self.tokenized
        return 1.0 - usable


@dataclass
class TokenizeStats:
    """Outcome of ``tokenize_conversations`` for one split."""

    conversations: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0  # kept, but trailing turns dropped to fit max_length
    turns_dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> reason -> count
    source_tokens: dict[str, list[int]] = field(default_factory=dict)  # source -> [tokens, supervised]

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: TokenizeStats) -> None:
        for name in ("conversations", "kept", "truncated", "turns_dropped", "tokens", "supervised_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped = dict(Counter(self.dropped) + Counter(other.dropped))
        for name, counts in other.by_source.items():
            self.by_source[name] = dict(Counter(self.by_source.get(name, {})) + Counter(counts))
        for name, (tok, sup) in other.source_tokens.items():
            mine = self.source_tokens.setdefault(name, [0, 0])
            mine[0], mine[1] = mine[0] + tok, mine[1] + sup


@dataclass
class DataReport:
    recipe: str
    sources: dict[str, SourceReport] = field(default_factory=dict)
    train: TokenizeStats | None = None
    held_out: TokenizeStats | None = None
    cache_hit: bool = False
    cache_path: str | None = None

    def bad_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.sources.values():
            total.update(s.bad)
        return dict(total)

    def check(self, max_bad_fraction: float) -> None:
        """Raise :class:`DataError` when more than ``max_bad_fraction`` of any source's rows (or of
        all rows) are unusable; the message lists the counts per source and reason."""
        rows = sum(s.rows for s in self.sources.values())
        unusable = sum(s.bad_fraction() * s.rows for s in self.sources.values())
        offenders = [s for s in self.sources.values() if s.bad_fraction() > max_bad_fraction]
        overall = unusable / rows if rows else 0.0
        if not offenders and overall <= max_bad_fraction:
            return
        lines = [
            f"too much bad data in recipe {self.recipe!r}: {overall:.1%} of {rows} rows unusable overall, "
            f"allowed {max_bad_fraction:.1%} per source and overall (raise max_bad_fraction in the recipe, "
            "or data.max_bad_fraction for one run, or fix the data):"
        ]
        for s in offenders or self.sources.values():
            lines.append(f"  {s.name}: {s.bad_fraction():.1%} of {s.rows} rows unusable; {_describe(s)}")
        raise DataError("\n".join(lines))

    def check_selected(self) -> None:
        """Raise :class:`DataError` when no source has a conversation left to use (every row
        malformed, or ``samples`` rounds to none), with each source's counts."""
        if any(s.selected for s in self.sources.values()):
            return
        lines = [
            f"no usable conversation in recipe {self.recipe!r} (fix the data, or raise a source's samples):"
        ]
        for s in self.sources.values():
            lines.append(f"  {s.name}: {s.rows} rows, {s.valid} valid, {s.selected} selected; {_describe(s)}")
        raise DataError("\n".join(lines))

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        out = [f"recipe {self.recipe}" + (f" (cached: {self.cache_path})" if self.cache_hit else "")]
        for s in self.sources.values():
            out.append(
                f"  {s.name} [{s.format}] {s.files} file(s): {s.rows} rows, {s.valid} valid, {s.selected} "
                f"selected -> {s.train} train / {s.held_out} held-out"
                + (
                    f" (-{s.held_out_near_duplicates} near-duplicates of training)"
                    if s.held_out_near_duplicates
                    else ""
                )
                + f", {s.tokens} tokens ({s.supervised_tokens} "
                f"supervised); {_describe(s)}"
            )
        for split, st in (("train", self.train), ("held_out", self.held_out)):
            if st is None:
                continue
            drops = ", ".join(f"{k} {v}" for k, v in sorted(st.dropped.items())) or "none"
            out.append(
                f"  {split}: {st.kept}/{st.conversations} examples, {st.tokens} tokens ({st.supervised_tokens} "
                f"supervised), {st.truncated} truncated (-{st.turns_dropped} turns), dropped: {drops}"
            )
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        d = dict(d)
        d["sources"] = {k: SourceReport(**v) for k, v in d["sources"].items()}
        for split in ("train", "held_out"):
            if d.get(split) is not None:
                d[split] = TokenizeStats(**d[split])
        return cls(**d)


def _describe(s: SourceReport) -> str:
    bad = ", ".join(f"{k} {v}" for k, v in sorted(s.bad.items())) or "none"
    text = f"malformed: {bad}"
    if s.tokenize_dropped:
        text += "; dropped when tokenising: " + ", ".join(
            f"{k} {v}" for k, v in sorted(s.tokenize_dropped.items())
        )
    return text
