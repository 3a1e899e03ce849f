"""The data pipeline on `datasets`: recipe -> conversations -> SPEED-encoded examples, cached.

``build_dataset`` is what training calls. Every stage is a ``datasets`` operation on Arrow data:

1. conversations (:func:`speed_train.data.recipes.load_conversations`): each source's rows through
   its format adapter; malformed rows keep their reason as data and are counted per source;
   sampling and the held-out split by a hash of each conversation's content.
2. encoding (:func:`encode_dataset`): ``Dataset.map(num_proc=...)`` with the role encoder
   (:func:`speed_train.speed.chat_roles.encode_conversation`); a conversation that cannot be
   used keeps its ``RoleError.reason`` and is counted per source and reason.
3. cache: the encoded train and held-out sets are written with ``save_to_disk`` into a folder
   named by the cache key, under a file lock (other ranks wait for the one build), and read back
   memory-mapped (``load_from_disk``) by every later run.

The cache key (:func:`cache_key`) is a sha256 of what changes the encoded tokens: recipe
content and data-file stats, tokenizer (name, vocabulary size, chat template, special tokens),
max_length, anchor policy, loss scope, truncation, the BoS rule, the held-out choice and the code
of the encoders. It is also the fingerprint given to ``Dataset.map``: ``datasets`` would
otherwise hash the tokenizer object (slow for a 128K vocabulary, and blind to an edited data
file behind an unchanged path). The SPEED cutoff K is not part of it: K does not change roles.
A folder is only ever complete: it is built under a temporary name and renamed into place; one
that does not load (or holds another key) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from speed_train.atomic import remove_orphans
from speed_train.speed import chat_roles as chat_roles_mod
from speed_train.speed import roles as roles_mod
from speed_train.speed.chat_roles import TRUNCATE, encode_conversation
from speed_train.speed.config import SpeedConfig
from speed_train.speed.roles import EncodedExample, RoleError

from . import recipes as recipes_mod
from . import report as report_mod
from . import sources as sources_mod
from .errors import DataError
from .recipes import Recipe, load_conversations, load_recipe
from .report import DataReport, TokenizeStats
from .sources import progress_for

log = logging.getLogger(__name__)

# Bump when the encoded columns or the cache layout change. The source files of the encoders and
# of this package's loading modules are hashed into the key too.
CODE_VERSION = 2
NO_SUPERVISED = "no_supervised_token"
ENCODED_COLUMNS = ("input_ids", "roles", "turns", "labels", "turn_spans")


def default_num_proc() -> int:
    """The cores this process may use (the node's cores, or the job's share of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Encoding


def _encode_batch(
    batch: dict[str, list[Any]],
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str,
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {
        k: [] for k in (*ENCODED_COLUMNS, "length", "num_supervised", "turns_dropped", "reason")
    }
    for messages in batch["messages"]:
        try:
            ex = encode_conversation(messages, tokenizer, speed_cfg, max_length=max_length, truncate=truncate)
            reason = None if ex.num_supervised() > 0 else NO_SUPERVISED
        except RoleError as exc:
            ex, reason = None, exc.reason
        if reason is not None or ex is None:
            for k in ENCODED_COLUMNS:
                out[k].append([])
            out["length"].append(0)
            out["num_supervised"].append(0)
            out["turns_dropped"].append(0)
        else:
            out["input_ids"].append(ex.input_ids)
            out["roles"].append(ex.roles)
            out["turns"].append(ex.turns)
            out["labels"].append(ex.labels)
            out["turn_spans"].append([list(s) for s in ex.meta["turn_spans"]])
            out["length"].append(len(ex))
            out["num_supervised"].append(ex.num_supervised())
            out["turns_dropped"].append(int(ex.meta.get("dropped_turns", 0)))
        out["reason"].append(reason)
    return out


def _encoded_features():
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "roles": List(Value("int8")),
            "turns": List(Value("int16")),
            "labels": List(Value("int32")),
            "turn_spans": List(List(Value("int32"))),
            "length": Value("int32"),
            "num_supervised": Value("int32"),
            "turns_dropped": Value("int16"),
            "reason": Value("string"),
            "source": Value("string"),
        }
    )


def _empty():
    """An encoded dataset with no rows (and the columns of a full one)."""
    from datasets import Dataset, Features

    features = _encoded_features()
    kept = Features({k: v for k, v in features.items() if k != "reason"})
    return Dataset.from_dict({k: [] for k in kept}, features=kept)


def encode_dataset(
    conversations: Any,
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str = "drop_turns",
    *,
    num_proc: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    fingerprint: str | None = None,
):
    """Encode a ``datasets.Dataset`` of conversations (columns ``messages`` and ``source``; a plain
    list of message lists is turned into one) with SPEED roles. Returns ``(kept, stats)``: the
    encoded examples that can be trained on, and per-reason drop counts.

    ``truncate``: ``"drop_turns"`` keeps the longest prefix of a too-long conversation that ends
    with a complete assistant turn (never cutting inside a turn); ``"error"`` drops the whole
    conversation as ``too_long``. ``num_proc`` > 1 encodes shards in worker processes (the result
    is identical); ``cache_dir``: where the Arrow files go (a temporary folder by default)."""
    from datasets import Dataset

    if truncate not in TRUNCATE:
        raise DataError(f"unknown truncate={truncate!r}: use one of {', '.join(TRUNCATE)}")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise DataError(f"max_length must be an int >= 2 (or None), got {max_length!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template: set tokenizer.chat_template before tokenising chat data"
        )
    if not isinstance(conversations, Dataset):
        conversations = Dataset.from_dict(
            {"messages": [list(c) for c in conversations], "source": ["" for _ in conversations]}
        )
    if len(conversations) == 0:  # datasets skips the function (and the new columns) on no rows
        return EncodedDataset(_empty()), TokenizeStats()
    tmp = None
    if cache_dir is None:
        tmp = tempfile.mkdtemp(prefix="speed-encode-")
        cache_dir = tmp
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    n = len(conversations)
    procs = max(1, min(num_proc, n // 64 or 1))
    with progress_for(n):
        encoded = conversations.map(
            _encode_batch,
            batched=True,
            batch_size=64,
            input_columns=None,
            num_proc=procs if procs > 1 else None,
            fn_kwargs=dict(
                tokenizer=tokenizer,
                speed_cfg=speed_cfg,
                max_length=max_length,
                truncate=truncate,
            ),
            remove_columns=[c for c in conversations.column_names if c != "source"],
            features=_encoded_features(),
            cache_file_name=str(Path(cache_dir) / "encoded.arrow"),
            new_fingerprint=fingerprint or _random_fingerprint(),
            desc="SPEED roles",
        )
        stats = _stats(encoded)
        keep = [i for i, r in enumerate(encoded["reason"]) if r is None]
        kept = encoded.select(keep) if len(keep) < n else encoded
        kept = kept.remove_columns("reason")
    if tmp is not None:
        kept = kept.flatten_indices(keep_in_memory=True)  # the temporary folder goes away
        shutil.rmtree(tmp, ignore_errors=True)
    return EncodedDataset(kept), stats


def _random_fingerprint() -> str:
    return hashlib.sha256(os.urandom(16)).hexdigest()[:16]


def _stats(encoded) -> TokenizeStats:
    cols = encoded.select_columns(["reason", "source", "length", "num_supervised", "turns_dropped"]).to_dict()
    stats = TokenizeStats(conversations=len(encoded))
    dropped: Counter[str] = Counter()
    by_source: dict[str, Counter[str]] = {}
    for reason, source, length, sup, cut in zip(
        cols["reason"], cols["source"], cols["length"], cols["num_supervised"], cols["turns_dropped"]
    ):
        if reason is not None:
            dropped[reason] += 1
            if source:
                by_source.setdefault(source, Counter())[reason] += 1
            continue
        stats.kept += 1
        stats.tokens += length
        stats.supervised_tokens += sup
        if source:
            per = stats.source_tokens.setdefault(source, [0, 0])
            per[0], per[1] = per[0] + length, per[1] + sup
        if cut:
            stats.truncated += 1
            stats.turns_dropped += cut
    stats.dropped = dict(dropped)
    stats.by_source = {k: dict(v) for k, v in by_source.items()}
    return stats


class EncodedDataset(Sequence[EncodedExample]):
    """SPEED-encoded examples on Arrow (memory-mapped when loaded from the cache).

    ``ds[i]`` is an :class:`EncodedExample` (lists of ints, as ``collate`` expects);
    ``lengths`` and ``supervised_counts()`` read one column, without building examples."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    @overload
    def __getitem__(self, i: int) -> EncodedExample: ...
    @overload
    def __getitem__(self, i: slice) -> EncodedDataset: ...
    def __getitem__(self, i: int | slice) -> EncodedExample | EncodedDataset:
        if isinstance(i, slice):
            return EncodedDataset(self.data.select(range(*i.indices(len(self)))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        row = self.data[i]
        meta = {
            "source": row["source"],
            "turn_spans": [tuple(s) for s in row["turn_spans"]],
            "dropped_turns": int(row["turns_dropped"]),
        }
        return EncodedExample(row["input_ids"], row["roles"], row["turns"], row["labels"], meta)

    def __iter__(self) -> Iterator[EncodedExample]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self):
        import torch

        return torch.tensor(self.data["length"], dtype=torch.int64)

    def supervised_counts(self):
        import torch

        return torch.tensor(self.data["num_supervised"], dtype=torch.int64)

    def num_tokens(self) -> int:
        return int(sum(self.data["length"]))

    def sources(self) -> list[str]:
        return list(self.data["source"])

    def stratified_sample(self, n: int, seed: int) -> EncodedDataset:
        """``n`` examples drawn at random within each source, in proportion to the sources' sizes
        (largest remainders), every source at least one when ``n`` allows; kept in dataset order.
        Depends on ``seed`` and the data only, so every arm and training seed gets the same sample."""
        sources = self.sources()
        if n >= len(sources):
            return self
        quota = allocate(Counter(sources), n)
        by_source: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            by_source.setdefault(s, []).append(i)
        keep = [
            i
            for s, idx in by_source.items()
            for i in random.Random(f"held-out sample:{seed}:{s}").sample(idx, quota[s])
        ]
        return EncodedDataset(self.data.select(sorted(keep)))


def allocate(counts: Counter[str] | dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over groups in proportion to ``counts`` (largest remainders, ties by name),
    each group at least one when ``n`` covers every group, none above its count."""
    total = sum(counts.values())
    n = min(n, total)
    floor = 1 if n >= len(counts) else 0
    share = {s: n * c / total for s, c in counts.items()}
    quota = {s: min(c, max(floor, int(share[s]))) for s, c in counts.items()}
    by_excess = sorted(counts, key=lambda s: (share[s] - quota[s], s))
    while sum(quota.values()) > n:  # the minimum of one pushed the sum over: take from the largest excess
        s = next(s for s in by_excess if quota[s] > floor)
        quota[s] -= 1
    for s in sorted(counts, key=lambda s: (-(share[s] - quota[s]), s)):
        if sum(quota.values()) >= n:
            break
        if quota[s] < counts[s]:
            quota[s] += 1
    while sum(quota.values()) < n:  # every remainder used and still short: fill where room is left
        s = next(s for s in sorted(counts) if quota[s] < counts[s])
        quota[s] += 1
    return quota


# --------------------------------------------------------------------------------------------
# Cache


def _code_fingerprint() -> str:
    """The encoders' and loaders' code: format adapters and readers (sources.adapters_code), role
    encoders, recipes, report and this module; editing any of them invalidates caches."""
    h = hashlib.sha256(f"{CODE_VERSION}:{sources_mod.adapters_code()}".encode())
    for mod in (roles_mod, chat_roles_mod, recipes_mod, report_mod, sys.modules[__name__]):
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
    *,
    held_out: int | float | None = None,
    held_out_recipe: Recipe | None = None,
    dedup_held_out: bool = True,
) -> str:
    """sha256 of everything that changes the cached examples (see the module doc). Not K."""
    blob = {
        "recipe": recipe.fingerprint(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "anchor": speed_cfg.anchor,
        "loss_scope": speed_cfg.loss_scope,
        "truncate": truncate,
        "add_bos": speed_cfg.add_bos,
        "held_out": held_out,
        "held_out_recipe": held_out_recipe.fingerprint() if held_out_recipe is not None else None,
        "dedup_held_out": dedup_held_out,
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    from speed_train.assets import cache_root

    return cache_root() / "datasets"


def _load_cache(folder: Path, key: str) -> tuple[EncodedDataset, EncodedDataset, DataReport] | None:
    if not folder.is_dir():
        return None
    try:
        from datasets import load_from_disk

        if (folder / "key").read_text().strip() != key:
            raise ValueError("key mismatch")
        train, held = (
            load_from_disk(str(folder / n)) if (folder / n).is_dir() else _empty()
            for n in ("train", "held_out")
        )
        report = DataReport.from_dict(json.loads((folder / "report.json").read_text(encoding="utf-8")))
        if len(train) != report.train.kept or len(held) != report.held_out.kept:  # type: ignore[union-attr]
            raise ValueError("example counts do not match the report")
    except Exception as exc:  # corrupt, truncated, foreign or outdated: rebuild
        log.warning(
            "ignoring unusable dataset cache %s (%s: %s); rebuilding", folder, type(exc).__name__, exc
        )
        return None
    return EncodedDataset(train), EncodedDataset(held), report


def build_dataset(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    truncate: str = "drop_turns",
    max_bad_fraction: float | None = None,
    num_proc: int | None = None,
    held_out: int | float | None = None,
    held_out_recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
    dedup_held_out: bool = True,
    rebuild: bool = False,
) -> tuple[EncodedDataset, EncodedDataset, DataReport]:
    """(train, held_out, report) for a recipe, from the cache when possible.

    ``cache_dir`` defaults to ``$SPEED_TRAIN_CACHE/datasets``. ``max_bad_fraction`` and
    ``held_out`` override the recipe's values when given (None: the recipe's); ``held_out`` is a
    count of conversations (int), a share (float in [0, 1)) or 0 for none.
    ``held_out_recipe``: held-out conversations from this other recipe instead (all of them, or
    ``held_out`` of them); the training recipe is then used whole, minus any conversation that
    also appears in the held-out set. ``dedup_held_out``: drop held-out conversations that share a
    normalised turn with training (``recipes.drop_near_duplicates``). ``num_proc``: processes for the conversion and encoding maps
    (default: the cores of this machine). ``report.cache_hit`` tells whether encoding was skipped;
    the bad-row limit is checked on a cache hit too. ``rebuild`` ignores an existing cache."""
    recipe = load_recipe(recipe)
    other = load_recipe(held_out_recipe) if held_out_recipe is not None else None
    limit = recipe.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
    num_proc = default_num_proc() if num_proc is None else num_proc
    if num_proc < 1:
        raise DataError(f"num_proc={num_proc}: give at least 1 process (or None for every core)")
    key = cache_key(
        recipe,
        tokenizer,
        speed_cfg,
        max_length,
        truncate,
        held_out=held_out,
        held_out_recipe=other,
        dedup_held_out=dedup_held_out,
    )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]", "_", recipe.name)  # a recipe name is free text; file names are not
    folder = root / f"{stem}-{key[:16]}"

    from filelock import FileLock  # dependency of huggingface_hub, hence of transformers

    # The lock makes concurrent ranks wait for one build instead of each encoding the recipe.
    with FileLock(str(root / f".{folder.name}.lock")):
        cached = None if rebuild else _load_cache(folder, key)
        if cached is not None:
            train, held, report = cached
            report.cache_hit = True
        else:
            remove_orphans(root, folder.name)  # left by a killed build (we hold the lock)
            work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
            try:
                train, held, report = _build(
                    recipe,
                    other,
                    held_out,
                    dedup_held_out,
                    tokenizer,
                    speed_cfg,
                    max_length,
                    truncate,
                    num_proc,
                    work,
                    key,
                )
                # Cached even if the bad-row check below fails: the limit is not in the key, so
                # raising it afterwards does not re-encode.
                final = work / "final"
                with progress_for(len(train)):
                    for name, split in (("train", train), ("held_out", held)):
                        if len(split):  # an empty split is no folder (datasets cannot reload one)
                            split.data.save_to_disk(str(final / name))
                final.mkdir(exist_ok=True)
                (final / "report.json").write_text(json.dumps(report.to_dict()), encoding="utf-8")
                (final / "key").write_text(key)
                if folder.exists():  # stale or corrupt: move it aside, then drop it
                    trash = work / "old"
                    os.replace(folder, trash)
                os.replace(final, folder)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            loaded = _load_cache(folder, key)
            if loaded is None:
                raise DataError(
                    f"the dataset cache {folder} did not load right after it was written; delete it"
                )
            train, held, _ = loaded
    report.cache_path = str(folder)
    report.check(limit)
    return train, held, report


def _build(
    recipe: Recipe,
    other: Recipe | None,
    held_out: int | float | None,
    dedup_held_out: bool,
    tokenizer: Any,
    speed_cfg: SpeedConfig,
    max_length: int | None,
    truncate: str,
    num_proc: int,
    work: Path,
    key: str,
) -> tuple[EncodedDataset, EncodedDataset, DataReport]:
    train_convs, held_convs, report = load_conversations(
        recipe,
        held_out=held_out,
        held_out_recipe=other,
        dedup_held_out=dedup_held_out,
        num_proc=num_proc,
        cache_dir=work / "conversations",
    )
    out = []
    for split, convs in (("train", train_convs), ("held_out", held_convs)):
        encoded, stats = encode_dataset(
            convs,
            tokenizer,
            speed_cfg,
            max_length,
            truncate,
            num_proc=num_proc,
            cache_dir=work / split,
            fingerprint=f"{key[:32]}-{split}",
        )
        setattr(report, split, stats)
        for name, s in report.sources.items():
            s.tokenized += getattr(s, split)
            s.tokenize_dropped = dict(Counter(s.tokenize_dropped) + Counter(stats.by_source.get(name, {})))
            tokens, supervised = stats.source_tokens.get(name, (0, 0))
            s.tokens, s.supervised_tokens = s.tokens + tokens, s.supervised_tokens + supervised
        out.append(encoded)
    return out[0], out[1], report
