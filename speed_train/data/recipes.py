"""Data recipes: a YAML mixture of chat sources, validated once, loaded into conversations.

A recipe names its sources (path + format + how many rows), an optional system prompt, the
held-out share and a seed; see ``speed_train/data/recipes/*.yaml`` (also reachable as the
top-level ``data_recipes/``). ``load_recipe("packaged_chat")`` finds a packaged recipe by name
through ``importlib.resources``, so it works from a wheel install as well as from a checkout.

Determinism: sampling and the held-out split depend only on the seed, the source name and
the rows themselves. Whether a conversation is held out is decided by a hash of its content
(``held_out`` is the expected share), so one conversation is on the same side in every recipe
that shares the seed, whatever the sample sizes, and exact duplicates never straddle the split.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import sources as src
from .errors import DataError, RecipeError
from .formats import ADAPTERS, FORMATS, BadRow, Conversation, normalize_messages
from .report import DataReport, SourceReport

RECIPE_KEYS = ("name", "description", "system_prompt", "sources", "held_out", "seed", "max_bad_fraction")
SOURCE_KEYS = ("name", "path", "format", "samples", "split", "subset", "revision")
DEFAULT_MAX_BAD_FRACTION = 0.05
_PACKAGE, _FOLDER = "speed_train.data", "recipes"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    format: str
    samples: int | float | None = None  # count, fraction in (0, 1], or None = all
    split: str = "train"  # for Hub ids and saved DatasetDicts
    subset: str | None = None  # Hub config name
    revision: str | None = None  # Hub revision (branch, tag or commit)
    resolved: src.Resolved = field(default_factory=lambda: src.Resolved("files"), compare=False)

    @property
    def hub_id(self) -> str | None:
        return self.resolved.hub_id

    def to_dict(self) -> dict[str, Any]:
        keys = ("name", "path", "format", "samples", "split", "subset", "revision")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class Recipe:
    name: str
    sources: tuple[SourceSpec, ...]
    system_prompt: str | None = None
    held_out: float = 0.0
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
        return _parse_file(path.read_text(encoding="utf-8"), str(path), path.resolve().parent)
    if path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text:
        raise RecipeError(f"recipe file {text!r} does not exist")
    entry = resources.files(_PACKAGE).joinpath(_FOLDER, f"{text}.yaml")
    if not entry.is_file():
        known = available_recipes()
        hint = difflib.get_close_matches(text, known, n=1)
        raise RecipeError(
            f"unknown recipe {text!r}: packaged recipes are {', '.join(known)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + "; or give the path of a recipe YAML file"
        )
    return _parse_file(entry.read_text(encoding="utf-8"), f"{_FOLDER}/{text}.yaml", Path(str(entry)).parent)


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


def _unknown_keys(d: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            raise RecipeError(
                f"{where}: unknown key {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; allowed keys: {', '.join(allowed)}"
            )


def _fraction(value: Any, where: str, *, upper_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        rng = "[0, 1)" if upper_open else "[0, 1]"
        raise RecipeError(f"{where} must be a fraction in {rng}, got {value!r}")
    return float(value)


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
        held_out=_fraction(doc.get("held_out", 0.0), f"{where}: held_out", upper_open=True),
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
        hint = difflib.get_close_matches(str(fmt), FORMATS, n=1)
        raise RecipeError(
            f"{where}: unknown format {fmt!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; use one of {', '.join(FORMATS)}"
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


def load_conversations(
    recipe: str | Path | Mapping[str, Any] | Recipe,
) -> tuple[list[Conversation], list[Conversation], DataReport]:
    """Read, validate, sample and split every source of a recipe.

    Returns ``(train, held_out, report)``: lists of ``{"role", "content"}`` conversations in
    source order (then file order). Malformed rows are skipped and counted per source and
    reason in ``report``; call ``report.check(recipe.max_bad_fraction)`` to enforce a limit
    (``build_dataset`` does). Hub sources are checked before any source is read, so a missing
    Hub fails fast with :class:`HubUnavailableError`."""
    recipe = load_recipe(recipe)
    snapshots = {s.name: src.prepare_hub(s) for s in recipe.sources if s.resolved.kind == "hub"}
    report = DataReport(recipe=recipe.name)
    train: list[Conversation] = []
    held_out: list[Conversation] = []
    for spec in recipe.sources:
        rep = SourceReport(name=spec.name, path=spec.path, format=spec.format, files=len(spec.resolved.files))
        report.sources[spec.name] = rep
        valid: list[Conversation] = []
        bad: Counter[str] = Counter()
        for row in src.iter_rows(spec, snapshots.get(spec.name)):
            rep.rows += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                valid.append(normalize_messages(ADAPTERS[spec.format](row)))
            except BadRow as exc:
                bad[exc.reason] += 1
        rep.bad, rep.valid = dict(bad), len(valid)
        for conv in _sample(valid, spec, recipe.seed):
            rep.selected += 1
            is_held = conversation_hash(conv, recipe.seed) < recipe.held_out  # before the system prompt
            rep.held_out += is_held
            rep.train += not is_held
            if recipe.system_prompt is not None and conv[0]["role"] != "system":
                conv = [{"role": "system", "content": recipe.system_prompt}, *conv]
            (held_out if is_held else train).append(conv)
    return train, held_out, report


def _sample(valid: list[Conversation], spec: SourceSpec, seed: int) -> list[Conversation]:
    if spec.samples is None:
        return valid
    n = spec.samples if isinstance(spec.samples, int) else round(spec.samples * len(valid))
    if n >= len(valid):  # asking for more than there is keeps everything (the report shows it)
        return valid
    rng = random.Random(f"{seed}:{spec.name}")
    keep = sorted(rng.sample(range(len(valid)), n))  # keep file order: the loader shuffles later
    return [valid[i] for i in keep]
