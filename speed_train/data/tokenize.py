"""Conversations -> SPEED-encoded examples, with an on-disk cache of the tokenised recipe.

``build_dataset`` is what training calls: it loads the recipe, tokenises train and held-out
conversations with :func:`speed_train.speed.roles.encode_conversation`, checks the share of
unusable rows, and caches the result. The cache key is a sha256 of everything that changes the
encoded tokens (see :func:`cache_key`); the SPEED cutoff K is not part of it because K does not
change roles or labels. A cache hit reads no data (so a Hub recipe needs no network once cached).

Cache file: ``<cache_dir>/<recipe>-<key[:16]>.pt``, a ``torch.save`` dict of flat tensors
(token ids, roles, turns, a supervised mask, offsets) that reloads memory-mapped. It is written
to a temporary file and ``os.replace``-d into place under a file lock, so readers never see a
partial file; a cache that does not load or does not match its key is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, overload

import torch

from speed_train.atomic import atomic_write
from speed_train.speed import roles as roles_mod
from speed_train.speed.config import SpeedConfig
from speed_train.speed.roles import IGNORE, EncodedExample, RoleError, encode_conversation

from . import formats as formats_mod
from . import recipes as recipes_mod
from . import report as report_mod
from . import sources as sources_mod
from .errors import DataError
from .recipes import Recipe, load_conversations, load_recipe
from .report import DataReport, TokenizeStats

log = logging.getLogger(__name__)

# Bump when the tokenisation or the cache layout changes. The source files of roles.py and of
# this package's loading modules are hashed into the key too, so editing them invalidates caches.
CODE_VERSION = 1
TRUNCATE_POLICIES = ("drop_turns", "error")

# RoleError message fragment -> drop reason (first match wins; anything else is "role_error").
_ROLE_ERROR_REASONS = (
    ("> max_length", "too_long"),
    ("merges tokens across", "token_merge"),
    ("end-of-turn text", "end_token_in_content"),
    ("no end-of-turn token", "no_end_token"),
    ("chat template", "template_error"),
    ("empty content", "empty_content"),
    ("no assistant message", "no_assistant_turn"),
)
NO_SUPERVISED = "no_supervised_token"


def role_error_reason(exc: RoleError) -> str:
    text = str(exc)
    return next((reason for frag, reason in _ROLE_ERROR_REASONS if frag in text), "role_error")


# --------------------------------------------------------------------------------------------
# Tokenisation


def tokenize_conversations(
    convs: Sequence[Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str = "drop_turns",
    *,
    sources: Sequence[str] | None = None,
    num_proc: int = 1,
    chunk_size: int = 1024,
) -> tuple[list[EncodedExample], TokenizeStats]:
    """Encode conversations with SPEED roles; drop (and count, per reason) those that cannot be used.

    ``truncate``: ``"drop_turns"`` keeps the longest prefix of a too-long conversation that ends
    with a complete assistant turn (never cutting inside a turn); ``"error"`` drops the whole
    conversation as ``too_long``. Either way a conversation whose first assistant turn alone
    exceeds ``max_length`` is dropped as ``too_long``. Other :class:`RoleError`s are counted
    under a short reason (``token_merge``, ``end_token_in_content``, ...). ``sources``, parallel
    to ``convs``, adds ``meta["source"]`` and per-source drop counts (``stats.by_source``).
    ``num_proc`` > 1 tokenises chunks of ``chunk_size`` conversations in forked worker
    processes; the result is identical."""
    examples: list[EncodedExample] = []
    stats = TokenizeStats()
    for exs, st in iter_tokenized(
        convs,
        tokenizer,
        speed_cfg,
        max_length,
        truncate,
        sources=sources,
        num_proc=num_proc,
        chunk_size=chunk_size,
    ):
        examples += exs
        stats.merge(st)
    return examples, stats


def iter_tokenized(
    convs: Sequence[Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str = "drop_turns",
    *,
    sources: Sequence[str] | None = None,
    num_proc: int = 1,
    chunk_size: int = 1024,
) -> Iterator[tuple[list[EncodedExample], TokenizeStats]]:
    """``tokenize_conversations`` chunk by chunk, in order (lets callers store each chunk compactly)."""
    _check_args(convs, tokenizer, max_length, truncate, sources)
    bounds = [(i, min(i + chunk_size, len(convs))) for i in range(0, len(convs), chunk_size)]
    chunks = ((list(convs[a:b]), list(sources[a:b]) if sources is not None else None) for a, b in bounds)
    args = (tokenizer, speed_cfg, max_length, truncate)
    if num_proc <= 1 or len(bounds) < 2:
        for chunk_convs, chunk_sources in chunks:
            yield _tokenize_chunk(chunk_convs, chunk_sources, *args)
        return
    # Forked workers get the tokenizer once through the initializer (not pickled per chunk);
    # map() returns the chunks in order.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker, initargs=args) as pool:
        yield from pool.map(_worker_chunk, *zip(*chunks))


def _check_args(
    convs: Sequence[Any], tokenizer: Any, max_length: int | None, truncate: str, sources: Sequence[str] | None
) -> None:
    if truncate not in TRUNCATE_POLICIES:
        raise DataError(f"unknown truncate={truncate!r}: use one of {', '.join(TRUNCATE_POLICIES)}")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise DataError(f"max_length must be an int >= 2 (or None), got {max_length!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template: set tokenizer.chat_template before tokenising chat data"
        )
    if sources is not None and len(sources) != len(convs):
        raise DataError(f"sources has {len(sources)} entries for {len(convs)} conversations")


_WORKER_ARGS: tuple[Any, ...] = ()


def _init_worker(*args: Any) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = args


def _worker_chunk(convs: list[Any], sources: list[str] | None) -> tuple[list[EncodedExample], TokenizeStats]:
    return _tokenize_chunk(convs, sources, *_WORKER_ARGS)


def _tokenize_chunk(
    convs: list[Sequence[Mapping[str, Any]]],
    sources: list[str] | None,
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str,
) -> tuple[list[EncodedExample], TokenizeStats]:
    stats = TokenizeStats(conversations=len(convs))
    dropped: Counter[str] = Counter()
    by_source: dict[str, Counter[str]] = {}
    examples: list[EncodedExample] = []
    for i, conv in enumerate(convs):
        source = sources[i] if sources else None
        try:
            ex = encode_conversation(conv, tokenizer, speed_cfg, max_length=max_length, truncate=truncate)  # type: ignore[arg-type]
            reason = None if ex.num_supervised() > 0 else NO_SUPERVISED
        except RoleError as exc:
            reason = role_error_reason(exc)
        if reason is not None:
            dropped[reason] += 1
            if source is not None:
                by_source.setdefault(source, Counter())[reason] += 1
            continue
        if source is not None:
            ex.meta["source"] = source
        if ex.meta.get("dropped_turns"):
            stats.truncated += 1
            stats.turns_dropped += ex.meta["dropped_turns"]
        stats.tokens += len(ex)
        stats.supervised_tokens += ex.num_supervised()
        examples.append(ex)
    stats.kept = len(examples)
    stats.dropped = dict(dropped)
    stats.by_source = {k: dict(v) for k, v in by_source.items()}
    return examples, stats


# --------------------------------------------------------------------------------------------
# Compact storage


class ExampleStore(Sequence[EncodedExample]):
    """Encoded examples as flat tensors (memory-mapped when loaded from the cache).

    ``store[i]`` builds the :class:`EncodedExample` on demand (lists of ints, as ``collate``
    expects; labels are the token ids where ``supervised``, else -100). ``lengths`` gives every
    example's token count without materialising it (for packing or length bucketing). Meta
    values that are the same for every example are stored once; JSON turns tuples into lists."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        roles: torch.Tensor,
        turns: torch.Tensor,
        supervised: torch.Tensor,
        offsets: torch.Tensor,
        meta: list[str],
        meta_common: str = "{}",
    ) -> None:
        self.input_ids, self.roles, self.turns, self.supervised = input_ids, roles, turns, supervised
        self.offsets, self.meta, self.meta_common = offsets, meta, meta_common
        self._common: dict[str, Any] = json.loads(meta_common)

    @classmethod
    def from_examples(cls, examples: Sequence[EncodedExample]) -> ExampleStore:
        builder = StoreBuilder()
        builder.add(examples)
        return builder.finish()

    def state(self) -> dict[str, Any]:
        names = ("input_ids", "roles", "turns", "supervised", "offsets", "meta", "meta_common")
        return {k: getattr(self, k) for k in names}

    def __len__(self) -> int:
        return len(self.meta)

    @overload
    def __getitem__(self, i: int) -> EncodedExample: ...
    @overload
    def __getitem__(self, i: slice) -> list[EncodedExample]: ...
    def __getitem__(self, i: int | slice) -> EncodedExample | list[EncodedExample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.input_ids[a:b].tolist()
        sup = self.supervised[a:b].tolist()
        return EncodedExample(
            input_ids=ids,
            roles=self.roles[a:b].tolist(),
            turns=self.turns[a:b].tolist(),
            labels=[t if s else IGNORE for t, s in zip(ids, sup)],
            meta=self._meta(i),
        )

    def _meta(self, i: int) -> dict[str, Any]:
        own = json.loads(self.meta[i])
        missing = own.pop(_MISSING_KEY, ())
        return {**{k: v for k, v in self._common.items() if k not in missing}, **own}

    def __iter__(self) -> Iterator[EncodedExample]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def supervised_counts(self) -> torch.Tensor:
        """Supervised tokens per example (== ``[ex.num_supervised() for ex in store]``, without
        building the examples)."""
        csum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(self.supervised, 0)])
        return csum[self.offsets[1:]] - csum[self.offsets[:-1]]


class StoreBuilder:
    """Collects examples chunk by chunk as flat tensors, so a large recipe never exists as
    Python lists of ints all at once (those take ~60 bytes per token, the tensors 8)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("input_ids", "roles", "turns", "supervised")
        }
        self.lengths: list[int] = []
        self.meta: list[str] = []
        self.common: dict[str, Any] | None = None

    def add(self, examples: Sequence[EncodedExample]) -> None:
        if not examples:
            return
        ids = torch.tensor([t for ex in examples for t in ex.input_ids], dtype=torch.int64)
        labels = torch.tensor([t for ex in examples for t in ex.labels], dtype=torch.int64)
        turns = torch.tensor([t for ex in examples for t in ex.turns], dtype=torch.int64)
        supervised = labels != IGNORE
        if not torch.equal(labels[supervised], ids[supervised]):
            raise DataError("internal error: a label differs from its token id; the cache cannot store it")
        if int(turns.max()) >= 2**15 or int(ids.max()) >= 2**31:
            raise DataError("a turn index or token id does not fit the cache's int16 / int32 columns")
        self.parts["input_ids"].append(ids.to(torch.int32))
        self.parts["roles"].append(torch.tensor([r for ex in examples for r in ex.roles], dtype=torch.int8))
        self.parts["turns"].append(turns.to(torch.int16))
        self.parts["supervised"].append(supervised)
        self.lengths += [len(ex) for ex in examples]
        for ex in examples:
            meta = json.loads(json.dumps(ex.meta))  # what the store gives back: JSON types
            if self.common is None:  # values every example shares are stored once
                self.common = {k: meta[k] for k in _COMMON_META if k in meta}
            own = {k: v for k, v in meta.items() if self.common.get(k, _MISSING) != v}
            missing = [k for k in self.common if k not in meta]
            if missing:
                own[_MISSING_KEY] = missing
            self.meta.append(json.dumps(own))

    def finish(self) -> ExampleStore:
        def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
            parts = self.parts[name]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

        return ExampleStore(
            input_ids=cat("input_ids", torch.int32),
            roles=cat("roles", torch.int8),
            turns=cat("turns", torch.int16),
            supervised=cat("supervised", torch.bool),
            offsets=torch.cumsum(torch.tensor([0, *self.lengths], dtype=torch.int64), 0),
            meta=self.meta,
            meta_common=json.dumps(self.common or {}),
        )


# Meta keys that are normally the same for every example of a build (checked per example).
_COMMON_META = ("kind", "anchor", "loss_scope", "end_token_ids", "header_text")
_MISSING_KEY = "__missing__"
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Cache


def _code_fingerprint() -> str:
    h = hashlib.sha256(str(CODE_VERSION).encode())
    for mod in (roles_mod, formats_mod, recipes_mod, sources_mod, report_mod, sys.modules[__name__]):
        h.update(Path(mod.__file__ or "").read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "class": type(tokenizer).__name__,
        "vocab_size": getattr(tokenizer, "vocab_size", None),
        "len": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": {
            k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())
        },
    }


def cache_key(
    recipe: Recipe,
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str = "drop_turns",
) -> str:
    """sha256 of everything that changes the cached examples: recipe content and data-file stats,
    tokenizer (name_or_path, vocab size, chat template, special tokens), max_length, anchor
    policy, loss scope, truncation policy and code version. Not K: it does not change roles."""
    blob = {
        "recipe": recipe.fingerprint(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "anchor": speed_cfg.anchor,
        "loss_scope": speed_cfg.loss_scope,
        "truncate": truncate,
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    from speed_train.assets import cache_root

    return cache_root() / "datasets"


def _load_cache(path: Path, key: str) -> tuple[ExampleStore, ExampleStore, DataReport] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        if blob.get("key") != key:
            raise ValueError("key mismatch")
        train, held = ExampleStore(**blob["train"]), ExampleStore(**blob["held_out"])
        report = DataReport.from_dict(json.loads(blob["report"]))
        if len(train) != report.train.kept or len(held) != report.held_out.kept:  # type: ignore[union-attr]
            raise ValueError("example counts do not match the report")
    except Exception as exc:  # corrupt, truncated, foreign or outdated: rebuild
        log.warning("ignoring unusable dataset cache %s (%s: %s); rebuilding", path, type(exc).__name__, exc)
        return None
    return train, held, report


def _write_cache(path: Path, blob: dict[str, Any]) -> None:
    atomic_write(path, lambda fh: torch.save(blob, fh), binary=True)


def build_dataset(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    truncate: str = "drop_turns",
    max_bad_fraction: float | None = None,
    num_proc: int = 1,
    rebuild: bool = False,
) -> tuple[ExampleStore, ExampleStore, DataReport]:
    """(train, held_out, report) for a recipe, from the cache when possible.

    ``cache_dir`` defaults to ``$SPEED_TRAIN_CACHE/datasets``. ``max_bad_fraction`` overrides
    the recipe's limit on unusable rows (:meth:`DataReport.check`); it is checked on a cache
    hit too. ``report.cache_hit`` tells whether tokenisation was skipped. ``rebuild`` ignores
    an existing cache."""
    recipe = load_recipe(recipe)
    limit = recipe.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
    key = cache_key(recipe, tokenizer, speed_cfg, max_length, truncate)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]", "_", recipe.name)  # a recipe name is free text; file names are not
    path = folder / f"{stem}-{key[:16]}.pt"

    from filelock import FileLock  # dependency of huggingface_hub, hence of transformers

    # The lock makes concurrent ranks wait for one build instead of each tokenising the recipe.
    with FileLock(str(folder / f".{path.name}.lock")):
        cached = None if rebuild else _load_cache(path, key)
        if cached is not None:
            train, held, report = cached
            report.cache_hit = True
        else:
            for orphan in folder.glob(f".{path.name}.tmp-*"):  # left by a killed build (we hold the lock)
                orphan.unlink(missing_ok=True)
            train, held, report = _build(recipe, tokenizer, speed_cfg, max_length, truncate, num_proc)
            # Cached even if the check below fails: the limit is not in the key, so raising it
            # afterwards does not re-tokenise.
            blob = {
                "key": key,
                "report": json.dumps(report.to_dict()),
                "train": train.state(),
                "held_out": held.state(),
            }
            _write_cache(path, blob)
    report.cache_path = str(path)
    report.check(limit)
    return train, held, report


def _build(
    recipe: Recipe,
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str,
    num_proc: int,
) -> tuple[ExampleStore, ExampleStore, DataReport]:
    train_convs, held_convs, report = load_conversations(recipe)
    stores = []
    for split, convs in (("train", train_convs), ("held_out", held_convs)):
        # Rows come in source order, so the per-source counts give each row's source.
        names = [n for n, s in report.sources.items() for _ in range(getattr(s, split))]
        builder, stats = StoreBuilder(), TokenizeStats()
        chunks = iter_tokenized(
            convs, tokenizer, speed_cfg, max_length, truncate, sources=names, num_proc=num_proc
        )
        for examples, chunk_stats in chunks:
            builder.add(examples)
            stats.merge(chunk_stats)
        setattr(report, split, stats)
        for name, s in report.sources.items():
            s.tokenized += getattr(s, split)
            s.tokenize_dropped = dict(Counter(s.tokenize_dropped) + Counter(stats.by_source.get(name, {})))
        stores.append(builder.finish())
    return stores[0], stores[1], report
