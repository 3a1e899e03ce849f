"""Serve a SPEED export over an OpenAI-compatible HTTP API: ``python -m speed_train.serve``.

    python -m speed_train.serve outputs/<run>/export/model --device cpu     # http://localhost:8000/v1
    speed-serve owner/name --host 0.0.0.0 --port 8000 --dtype bfloat16     # a Hub id

This is transformers' own server (``transformers serve``: FastAPI + uvicorn; /v1/chat/completions
with streaming, /v1/completions, /v1/responses, /v1/models, /health) with its flags, serving one
HF-native SPEED export (:mod:`speed_train.hf.serving` makes the ``speed_<arch>`` classes
resolvable to it). Every request runs the export's ``generate()``: the history is prompt (shallow
prefill: lower K layers), the new assistant turn is decode (all layers), as in training. ``stop``,
``max_tokens``, ``temperature``, ``top_p`` and ``seed`` are transformers' own; requests are served
one at a time. Continuous batching and ``--compile`` are refused below full depth: their caches
keep every token at every layer, SPEED's upper layers keep the anchor and the decode tokens only.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from speed_train.speed.config import SpeedConfig, SpeedConfigError

# Tested on this range: the hooks use transformers' serving internals (ModelLoader, Serve), which
# change between releases. pyproject.toml's `serve` extra pins the same range.
TESTED_TRANSFORMERS = ">=5.25,<5.26"
PROG = "python -m speed_train.serve"
HELP = (
    "Serve an HF-native SPEED export with transformers' own OpenAI-compatible server and its flags: "
    "POST /v1/chat/completions (stream too), /v1/completions, /v1/responses; GET /v1/models, /health. "
    "Every request runs the export's generate(): the history through the lower K layers (shallow "
    "prefill), the new assistant turn through all layers (deep decode)."
)


class ServeError(ValueError):
    """Refused before anything heavy loads; printed as one ``error:`` line."""


def check_transformers(version: str | None = None) -> None:
    """The installed transformers is in the tested range, with its serving extras."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) not in SpecifierSet(TESTED_TRANSFORMERS, prereleases=True):
        raise ServeError(
            f"the SPEED server hooks into transformers' serving internals and is tested with "
            f"transformers{TESTED_TRANSFORMERS}; found {version}: pip install 'speed_train[serve]'"
        )
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ServeError(
            "serving needs fastapi, uvicorn and openai (transformers' serving extras): "
            "pip install 'speed_train[serve]'"
        )


def check_export(name: str):
    """The config of the HF-native SPEED export ``name`` (a folder or a Hub id)."""
    from transformers import AutoConfig

    import speed_train.hf  # noqa: F401  (the speed_* model types)
    from speed_train.hf import SPEED_CLASSES
    from speed_train.loading import PACKAGED_MODELS, ModelNotFoundError, resolve

    if name in PACKAGED_MODELS:
        raise ServeError(
            f"{name!r} is a plain packaged model, not a SPEED export: train one (python -m speed_train) "
            "or export it at a cutoff with speed_train.hf.export.make_hf_native"
        )
    try:
        where = resolve(name, what="model")
    except ModelNotFoundError as e:
        raise ServeError(str(e)) from None
    try:
        config = AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        raise ServeError(f"{name}: no loadable config.json ({str(e).splitlines()[0]})") from None
    speed_types = {config_cls.model_type for config_cls, _ in SPEED_CLASSES.values()}
    if config.model_type not in speed_types:
        raise ServeError(
            f"{name} is not an HF-native SPEED export (model_type {config.model_type!r}, expected one of "
            f"{', '.join(sorted(speed_types))}); serve a training run's export/model folder"
        )
    return config


def saved_settings(config) -> SpeedConfig:
    """The export's SPEED settings (``SpeedConfig.from_hf_config``), a bad K as a ServeError."""
    try:
        return SpeedConfig.from_hf_config(config) or SpeedConfig()
    except SpeedConfigError as e:
        raise ServeError(str(e)) from None


def check_flags(speed: SpeedConfig, num_layers: int, flags: dict) -> None:
    """Refuse what cannot run SPEED's two-depth cache exactly (below full depth)."""
    k, L = speed.resolve_k(num_layers), num_layers
    if k >= L:
        return  # full depth: the unmodified model
    if flags.get("continuous_batching"):
        raise ServeError(
            "--continuous-batching cannot run SPEED: its paged cache keeps every token at every layer "
            f"and packs requests into one row; SPEED-{k} of {L} layers keeps the upper layers' anchor and "
            "decode tokens only (serve without it: one request at a time through generate())"
        )
    if flags.get("compile"):
        raise ServeError(
            "--compile generates with a static cache of every token at every layer; SPEED's two-depth "
            "cache is its own (serve without --compile)"
        )


def build_app():
    """A typer app with transformers serve's flags (its own ``Serve`` signature), serving one export."""
    import typer

    from speed_train.hf.serving import SpeedServe

    signature = inspect.signature(SpeedServe)
    params = list(signature.parameters.values())
    if not params or params[0].name != "force_model":
        raise ServeError("transformers' Serve has changed: its first argument is not the model")
    model = params[0].replace(
        annotation=Annotated[
            str,
            typer.Argument(
                metavar="EXPORT_OR_HUB_ID",
                help="An HF-native SPEED export: a training run's export/model folder, or a Hub id.",
            ),
        ],
        default=inspect.Parameter.empty,
    )

    def serve(**flags) -> None:
        try:
            config = check_export(flags["force_model"])
            speed, L = saved_settings(config), config.num_hidden_layers
            check_flags(speed, L, flags)
        except ServeError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        k = speed.resolve_k(L)
        depth = f"K={k} of {L}" if k < L else f"full depth ({L})"
        print(
            f"# SPEED {config.model_type}, {depth} layers, anchor {speed.anchor}: "
            f"OpenAI API at http://{flags['host']}:{flags['port']}/v1, model {flags['force_model']!r}",
            file=sys.stderr,
            flush=True,
        )
        SpeedServe(**flags)  # serves until stopped (Ctrl+C, SIGTERM)

    serve.__signature__ = signature.replace(parameters=[model, *params[1:]])
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help=HELP)(serve)
    return app


class LocalServer:
    """``python -m speed_train.serve MODEL`` in a subprocess on 127.0.0.1 (tests, the load benchmark):
    ``start()`` waits until /health answers (bounded), ``stop()`` sends Ctrl+C (SIGINT), then kills
    after ``stop_timeout_s``. Its output goes to ``log``; ``env`` adds to the environment."""

    def __init__(
        self,
        model,
        log,
        *flags: str,
        env: dict | None = None,
        start_timeout_s: float = 240,
        stop_timeout_s: float = 60,
    ):
        self.model, self.log, self.flags, self.env = str(model), Path(log), list(flags), env or {}
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalServer:
        with socket.socket() as s:  # a free port (the server binds it a moment later)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "speed_train.serve", self.model, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *self.flags]
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **self.env}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        for _ in range(int(self.start_timeout_s * 2) + 1):  # a poll every 0.5 s at most
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:  # not listening yet
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not start; its log ({self.log}) ends:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Ctrl+C, then a kill if it has not exited in time; its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(self.stop_timeout_s)
        return self.proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:] if self.log.is_file() else ""

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        check_transformers()
        app = build_app()
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app(args=list(sys.argv[1:] if argv is None else argv), prog_name=PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
