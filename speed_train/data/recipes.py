"""Data recipes: a YAML mixture of chat sources, validated once, loaded into conversations.

A recipe names its sources (path + format + how many rows), an optional system prompt, the
held-out share and a seed; see ``speed_train/data/recipes/*.yaml`` (also reachable as the
top-level ``data_recipes/``). ``load_recipe("packaged_chat")`` finds a packaged recipe by name
through ``importlib.resources``, so it works from a wheel install as well as from a checkout.

Held-out set (``held_out``): a count of conversations (int, e.g. 1000), a share (float in
[0, 1), e.g. 0.05), or 0 for none (train on everything). A run config can override it, or take
its held-out conversations from another recipe.

Near-duplicates (``dedup_held_out``, on by default): a held-out conversation any of whose user or
assistant turns, normalised (:func:`normalized_turn`: case, Unicode form, punctuation and spacing
folded), is also a turn of the same role in training is dropped from the held-out set (counted per
source as ``held_out_near_duplicates``). Templated data (FastChat's dummy conversations) repeats
turns across conversations, so a content-hash split alone leaves a held-out set partly memorised.

Determinism: sampling and the held-out split depend only on the seed, the source name and
the rows themselves. Each conversation gets a number in [0, 1) from a hash of its content; a
share holds out those below it, a count the ``n`` smallest (with ties, so exact duplicates never
straddle the split). A conversation is therefore on the same side in every recipe that shares
the seed, whatever the sample sizes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import sources as src
from .errors import DataError, RecipeError
from .formats import FORMATS, Conversation
from .report import DataReport, SourceReport
from .sources import SourceSpec  # noqa: F401  (a recipe's source; defined beside its resolution)

RECIPE_KEYS = ("name", "description", "system_prompt", "sources", "held_out", "seed", "max_bad_fraction")
SOURCE_KEYS = ("name", "path", "format", "samples", "split", "subset", "revision")
DEFAULT_MAX_BAD_FRACTION = 0.05
_PACKAGE, _FOLDER = "speed_train.data", "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    sources: tuple[SourceSpec, ...]
    system_prompt: str | None = None
    held_out: int | float = 0.0  # count (int) or share (float in [0, 1))
    seed: int = 0
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    description: str | None = None
    origin: str = "<dict>"  # file the recipe came from, for messages

    def to_dict(self) -> dict[str, Any]:
        """The recipe's content (no file location), canonical for hashing."""
        return {
            "name": self.name,
            "system_prompt": self.system_prompt,
            "held_out": self.held_out,
            "seed": self.seed,
            "max_bad_fraction": self.max_bad_fraction,
            "sources": [s.to_dict() for s in self.sources],
        }

    def fingerprint(self) -> dict[str, Any]:
        """Content plus a stat-only identity of every data file (no data is read)."""
        return {"recipe": self.to_dict(), "data": [s.resolved.fingerprint() for s in self.sources]}


# --------------------------------------------------------------------------------------------
# Loading and validation


def available_recipes() -> list[str]:
    folder = resources.files(_PACKAGE).joinpath(_FOLDER)
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def load_recipe(name_or_path: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """A recipe by packaged name (``"packaged_chat"``), YAML file path, or an already parsed mapping.

    Relative data paths are resolved against the recipe file's folder (the working directory
    for a mapping). Raises :class:`RecipeError` with the offending key and what to do."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return parse_recipe(_plain(name_or_path), origin="<dict>", base_dir=Path.cwd())
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return _parse_file(path.read_text(encoding="utf-8-sig"), str(path), path.resolve().parent)
    if path.is_dir():
        raise RecipeError(
            f"recipe {text!r} is a folder: give a recipe YAML file in it, or a packaged recipe name "
            f"({', '.join(available_recipes())}); data files belong in a recipe's sources"
        )
    if path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text:
        raise RecipeError(f"recipe file {text!r} does not exist")
    entry = resources.files(_PACKAGE).joinpath(_FOLDER, f"{text}.yaml")
    if not entry.is_file():
        known = available_recipes()
        raise RecipeError(
            f"unknown recipe {text!r}: packaged recipes are {', '.join(known)}"
            f"{did_you_mean(text, known)}; or give the path of a recipe YAML file"
        )
    return _parse_file(
        entry.read_text(encoding="utf-8-sig"), f"{_FOLDER}/{text}.yaml", Path(str(entry)).parent
    )


def _plain(obj: Any) -> Any:
    """Plain dicts / lists from any mapping / sequence (e.g. an OmegaConf node from a Hydra config)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def _parse_file(text: str, origin: str, base_dir: Path) -> Recipe:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {origin}: not valid YAML: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise RecipeError(f"recipe {origin}: expected a mapping at the top level, got {type(doc).__name__}")
    return parse_recipe(doc, origin=origin, base_dir=base_dir)


def did_you_mean(value: object, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ''."""
    hint = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _unknown_keys(d: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in allowed:
            raise RecipeError(
                f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"
            )


def _fraction(value: Any, where: str, *, upper_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        rng = "[0, 1)" if upper_open else "[0, 1]"
        raise RecipeError(f"{where} must be a fraction in {rng}, got {value!r}")
    return float(value)


def parse_held_out(value: Any, where: str, error: type[Exception] = RecipeError) -> int | float:
    """A held-out count (int >= 0) or share (float in [0, 1))."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where} must be a count of conversations (int) or a share in [0, 1), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise error(f"{where}={value}: a count must be >= 0 (0: no held-out set)")
        return value
    if not 0.0 <= value < 1.0:
        raise error(f"{where}={value}: a share must be in [0, 1); give an int for a count (e.g. 1000)")
    return value


def _samples(value: Any, where: str) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(
            f"{where}: samples must be a row count (int), a fraction in (0, 1], or null; got {value!r}"
        )
    if isinstance(value, int):
        if value < 1:
            raise RecipeError(f"{where}: samples={value} must be at least 1 (or null for all rows)")
        return value
    if not 0.0 < value <= 1.0:
        raise RecipeError(
            f"{where}: samples={value} is a float outside (0, 1]: give a fraction like 0.5 or an int count like 1000"
        )
    return value


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    value = d.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise RecipeError(f"{where}: {key} must be a non-empty string or null, got {value!r}")
    return value


def parse_recipe(doc: Mapping[str, Any], *, origin: str = "<dict>", base_dir: Path | None = None) -> Recipe:
    """Validate a parsed recipe mapping. Raises :class:`RecipeError`."""
    where = f"recipe {origin}"
    _unknown_keys(doc, RECIPE_KEYS, where)
    name = doc.get("name") or (Path(origin).stem if origin != "<dict>" else None)
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"{where}: 'name' must be a non-empty string")
    raw_sources = doc.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise RecipeError(f"{where}: 'sources' must be a non-empty list of {{name, path, format, samples}}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"{where}: seed must be an int, got {seed!r}")
    specs: list[SourceSpec] = []
    for i, s in enumerate(raw_sources):
        specs.append(_parse_source(s, f"{where}: sources[{i}]", base_dir))
    names = Counter(s.name for s in specs)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise RecipeError(f"{where}: source names must be unique, {dup[0]!r} appears {names[dup[0]]} times")
    return Recipe(
        name=name,
        sources=tuple(specs),
        system_prompt=_opt_str(doc, "system_prompt", where),
        held_out=parse_held_out(doc.get("held_out", 0.0), f"{where}: held_out", RecipeError),
        seed=seed,
        max_bad_fraction=_fraction(
            doc.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION),
            f"{where}: max_bad_fraction",
            upper_open=False,
        ),
        description=_opt_str(doc, "description", where),
        origin=origin,
    )


def _parse_source(s: Any, where: str, base_dir: Path | None) -> SourceSpec:
    if not isinstance(s, Mapping):
        raise RecipeError(f"{where} must be a mapping with name, path and format, got {type(s).__name__}")
    _unknown_keys(s, SOURCE_KEYS, where)
    name = s.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name})"
    path = s.get("path")
    if not isinstance(path, str) or not path.strip():
        raise RecipeError(
            f"{where}: missing 'path' (a local file/folder/glob, pkg://<package>/<file>, or a Hub id)"
        )
    fmt = s.get("format")
    if fmt not in FORMATS:
        raise RecipeError(
            f"{where}: unknown format {fmt!r}{did_you_mean(fmt, FORMATS)}; use one of {', '.join(FORMATS)}"
        )
    split = s.get("split", "train")
    if not isinstance(split, str) or not split:
        raise RecipeError(f"{where}: split must be a non-empty string, got {split!r}")
    try:
        resolved = src.resolve(path, base_dir)
    except DataError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    return SourceSpec(
        name=name,
        path=path,
        format=fmt,
        samples=_samples(s.get("samples"), where),
        split=split,
        subset=_opt_str(s, "subset", where),
        revision=_opt_str(s, "revision", where),
        resolved=resolved,
    )


# --------------------------------------------------------------------------------------------
# Conversations


def conversation_hash(messages: Conversation, seed: int) -> float:
    """Uniform number in [0, 1) from the seed and the conversation's content."""
    blob = json.dumps([seed, messages], ensure_ascii=False, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") / 2.0**64


def normalized_turn(text: str) -> str:
    """A turn's text for near-duplicate matching: NFKC, case-folded, every run of non-word
    characters (punctuation, underscores, whitespace) one space, trimmed."""
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


_NON_WORD = re.compile(r"[\W_]+")


def _turn_key(role: str, text: str) -> bytes:
    return hashlib.blake2b(f"{role}\x00{normalized_turn(text)}".encode(), digest_size=12).digest()


def _conversation_turn_keys(messages: Conversation) -> list[bytes]:
    return [_turn_key(m["role"], m["content"]) for m in messages if m["role"] in ("user", "assistant")]


def drop_near_duplicates(train, held):
    """(held without its near-duplicates of ``train``, {source: number dropped}); see the module
    doc. Training turns are streamed and kept as 12-byte digests (the Tulu mixture has millions)."""
    seen: set[bytes] = set()
    for batch in train.select_columns(["messages"]).iter(batch_size=10_000):
        for messages in batch["messages"]:
            seen.update(_conversation_turn_keys(messages))
    keep, dropped = [], Counter()
    for i, (messages, source) in enumerate(zip(held["messages"], held["source"])):
        if any(k in seen for k in _conversation_turn_keys(messages)):
            dropped[source] += 1
        else:
            keep.append(i)
    return (held.select(keep) if dropped else held), dict(dropped)


def load_conversations(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    *,
    held_out: int | float | None = None,
    held_out_recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
    dedup_held_out: bool = True,
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
):
    """Read, validate, sample and split every source of a recipe.

    Returns ``(train, held_out, report)``: ``datasets.Dataset``s with columns ``messages`` (a
    list of ``{"role", "content"}``) and ``source``, in source order (then file order).
    Malformed rows are skipped and counted per source and reason in ``report``; call
    ``report.check(recipe.max_bad_fraction)`` to enforce a limit (``build_dataset`` does).
    ``held_out`` overrides the recipe's (count, share or 0); ``held_out_recipe`` takes the
    held-out set from another recipe (its conversations that are also in this one are removed
    from training). ``dedup_held_out``: drop held-out conversations that share a normalised turn
    with training (module doc). Hub sources are checked before any source is read, so a missing Hub fails
    fast with :class:`HubUnavailableError`. ``cache_dir``: where Arrow files go (default: memory
    for local files, the HF cache for Hub datasets)."""
    recipe = load_recipe(recipe)
    share_or_count = recipe.held_out if held_out is None else parse_held_out(held_out, "held_out", DataError)
    report = DataReport(recipe=recipe.name)
    convs = _selected(recipe, report, num_proc, cache_dir)
    if held_out_recipe is None:
        train, held = _split(convs, share_or_count)
    else:
        other = load_recipe(held_out_recipe)
        held_report = DataReport(recipe=other.name)
        held_all = _selected(other, held_report, num_proc, cache_dir, seed=recipe.seed)
        clash = set(report.sources) & set(held_report.sources)
        if clash:
            raise RecipeError(
                f"held-out recipe {other.name!r} reuses source names of {recipe.name!r} ({', '.join(sorted(clash))}); "
                "rename its sources so the report can tell them apart"
            )
        _, held = _split(held_all, share_or_count if held_out is not None else 0.0, invert=True)
        held_keys = set(held["key"])
        train = convs.filter(lambda k: k not in held_keys, input_columns="key") if held_keys else convs
        report.sources.update(held_report.sources)
    if dedup_held_out and len(held) and len(train):
        held, dropped = drop_near_duplicates(train, held)
        for name, n in dropped.items():
            report.sources[name].held_out_near_duplicates = n
    for split, ds in (("train", train), ("held_out", held)):
        for name, n in Counter(ds["source"]).items():
            setattr(report.sources[name], split, n)
    return train.remove_columns("key"), held.remove_columns("key"), report


def _selected(
    recipe: Recipe, report: DataReport, num_proc: int, cache_dir: str | Path | None, seed: int | None = None
):
    """Every source's valid, sampled conversations, with ``source`` and the held-out ``key``."""
    from datasets import concatenate_datasets

    seed = recipe.seed if seed is None else seed
    snapshots = {s.name: src.prepare_hub(s) for s in recipe.sources if s.resolved.kind == "hub"}
    parts = []
    for spec in recipe.sources:
        rep = SourceReport(name=spec.name, path=spec.path, format=spec.format, files=len(spec.resolved.files))
        report.sources[spec.name] = rep
        rows = src.conversation_dataset(
            spec, snapshots.get(spec.name), num_proc=num_proc, cache_dir=cache_dir
        )
        reasons = rows["reason"]
        rep.rows = len(reasons)
        rep.bad = dict(Counter(r for r in reasons if r is not None))
        valid = [i for i, r in enumerate(reasons) if r is None]
        rep.valid = len(valid)
        if rep.rows == 0:
            where = ", ".join(str(f) for f in spec.resolved.files) or spec.path
            raise DataError(f"source {spec.name!r} of recipe {recipe.name!r} has no rows: {where} is empty")
        keep = _sample(valid, spec, recipe.seed)
        rep.selected = len(keep)
        with src.progress_for(len(keep)):
            part = rows.select(keep).remove_columns("reason")
        part = part.add_column("source", [spec.name] * len(part))
        parts.append(part)
    report.check_selected()  # else the empty mixture below has no columns to split on
    rows = sum(len(p) for p in parts)
    with src.progress_for(rows):
        convs = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return convs.map(
            _key_and_system_batch,
            batched=True,
            fn_kwargs={"seed": seed, "system_prompt": recipe.system_prompt},
            num_proc=num_proc if num_proc > 1 and len(convs) >= 10_000 else None,
            keep_in_memory=cache_dir is None,
            desc="held-out keys",
        )


def _key_and_system_batch(
    batch: dict[str, list[Any]], seed: int, system_prompt: str | None
) -> dict[str, list]:
    """The held-out key of each conversation (of its own content, before the recipe's system
    prompt), then the system prompt for conversations that have none."""
    keys = [conversation_hash(m, seed) for m in batch["messages"]]
    if system_prompt is None:
        return {"key": keys}
    system = {"role": "system", "content": system_prompt}
    messages = [m if m and m[0]["role"] == "system" else [system, *m] for m in batch["messages"]]
    return {"key": keys, "messages": messages}


def _split(convs, held_out: int | float, invert: bool = False):
    """(train, held) by the content keys: a share holds out keys below it, a count the smallest
    ``n`` keys (all copies of a tied key). ``invert``: for a separate held-out recipe, where 0
    means "all of it"."""
    keys = convs["key"]
    if invert and not held_out:
        return convs.select([]), convs
    if isinstance(held_out, float):
        held_idx = [i for i, k in enumerate(keys) if k < held_out]
    elif held_out >= len(keys):
        held_idx = list(range(len(keys)))
    elif held_out > 0:
        cut = sorted(keys)[held_out - 1]
        held_idx = [i for i, k in enumerate(keys) if k <= cut]
    else:
        held_idx = []
    held_set = set(held_idx)
    train_idx = [i for i in range(len(keys)) if i not in held_set]
    return convs.select(train_idx), convs.select(held_idx)


def _sample(valid: list[int], spec: SourceSpec, seed: int) -> list[int]:
    """Row indices kept by ``samples`` (file order; the loader shuffles later)."""
    if spec.samples is None:
        return valid
    n = spec.samples if isinstance(spec.samples, int) else round(spec.samples * len(valid))
    if n >= len(valid):  # asking for more than there is keeps everything (the report shows it)
        return valid
    rng = random.Random(f"{seed}:{spec.name}")
    return [valid[i] for i in sorted(rng.sample(range(len(valid)), n))]
