"""lm-evaluation-harness model type ``speed``: any lm-eval task under SPEED.

    python -m speed_train.eval.lm_eval_adapter --model speed \\
        --model_args pretrained=smollm2,k=24,anchor=bos --tasks arc_easy --limit 50

    speed-lm-eval --model speed --model_args pretrained=... --tasks ...     # the same, installed script

lm-eval finds model types in its registry; importing this module registers ``speed``. The
commands above are lm-eval's own CLI with this module imported first. The bare ``lm_eval``
console script cannot find ``speed``: lm-eval 0.4.x has no plugin discovery (its registry is a
fixed table of its own modules), so ``lm_eval --model speed`` answers "no model for this name".
From Python, ``import speed_train.eval.lm_eval_adapter`` then
``lm_eval.simple_evaluate(model="speed", model_args=...)``. ``pretrained``
is ``smollm2`` (the packaged model), a local HF directory (its ``speed_config.json`` gives K and
the anchor when not set; ``k=full`` forces full depth) or a hub id; ``adapter=`` loads a LoRA adapter on top.

``batch_size=auto`` is taken as 8 (no memory probing). loglikelihood uses the shared-context SPEED scorer (the context's answer cue and the
continuation are decode phase); generate_until uses shallow-prefill generation.
"""

from __future__ import annotations

import sys

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional extra
    raise ImportError(f"the lm-eval adapter needs lm-eval: pip install 'speed_train[eval]' ({e})") from None

from speed_train.eval.run import load_eval_model
from speed_train.eval.scoring import generate_text, score_requests
from speed_train.speed.config import SpeedConfig


def _k(value):
    if value is None or value in ("", "None", "full"):
        return None
    if isinstance(value, (int, float)):
        return value
    return float(value) if "." in str(value) else int(value)


@register_model("speed")
class SpeedLMEval(LM):
    def __init__(self, pretrained: str = "smollm2", k="saved", anchor: str | None = None, adapter: str | None = None,
                 batch_size: int | str = 8, dtype: str = "auto", max_gen_toks: int = 256, device: str | None = None,
                 **kwargs) -> None:  # fmt: skip
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for --model speed: {', '.join(sorted(kwargs))} (known: pretrained, "
                             "k, anchor, adapter, batch_size, dtype, max_gen_toks, device)")  # fmt: skip
        self.model, self.tokenizer, saved = load_eval_model(pretrained, adapter, dtype, device)
        # k left out: the model's speed_config.json (else full depth); k=None / "None" / "full":
        # full depth, however lm-eval hands the value over (string or parsed None)
        k = saved.get("k") if k == "saved" else _k(k)
        self.cfg = SpeedConfig(k=k, anchor=anchor or saved.get("anchor", "bos"))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(
            dict(kv.split("=", 1) for kv in arg_string.split(",") if kv), additional_config
        )

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        # lm-eval passes its --batch_size / --device here; model_args win. Its CLI's default device
        # is "cuda:0" even on a machine without one: then fall back to our default (cpu), like HFLM.
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k in ("batch_size", "device") and k not in arg_dict}  # fmt: skip
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]
        return cls(**arg_dict, **extra)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.args[0], []).append(i)
        ctxs = list(groups)
        scores = score_requests(self.model, self.tokenizer, self.cfg,
                                [(c, [requests[i].args[1] for i in groups[c]]) for c in ctxs],
                                batch_size=self.batch_size)  # fmt: skip
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for c, sc in zip(ctxs, scores):
            for i, s in zip(groups[c], sc):
                out[i] = (s.logprob, s.greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # whole document as the continuation of an empty (BoS-only) context
        return [s[0].logprob for s in score_requests(self.model, self.tokenizer, self.cfg,
                                                     [("", [r.args[0]]) for r in requests], batch_size=1)]  # fmt: skip

    def generate_until(self, requests, disable_tqdm: bool = False):
        outs = []
        for r in requests:
            ctx, kw = r.args
            until = kw.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            outs += generate_text(self.model, self.tokenizer, self.cfg, [ctx],
                                  max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)),
                                  stop_sequences=tuple(until), batch_size=1)  # fmt: skip
        return outs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
