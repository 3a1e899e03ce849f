"""The model card (README.md in the Hub's format) written into every export."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from speed_train.speed.config import SpeedConfig


def inference_saving(config, k: int, context: int) -> dict[str, float]:
    """Active KV and prefill FLOPs of SPEED-K relative to full depth, for one prompt of ``context``
    tokens with a 1-token anchor and a short header (the formulas of speed_train.bench.inference)."""
    from speed_train.speed.flops import ModelShape, kv_bytes_formula, prefill_flops

    shape = ModelShape.from_config(config)
    kept = 1 + 4  # anchor + a typical assistant header
    kv = kv_bytes_formula(shape, k, context, kept, 1, 2) / kv_bytes_formula(
        shape, shape.layers, context, kept, 1, 2
    )
    flops = prefill_flops(shape, k, context, kept, 1) / prefill_flops(shape, shape.layers, context, kept, 1)
    return {"kv_ratio": kv, "prefill_flop_ratio": flops}


def _use_hf_native(repo: str | None, L: int) -> list[str]:
    return [
        "This folder is an HF-native SPEED model: loaded with `trust_remote_code=True`, `generate()`, "
        "pipelines and streamers do the shallow prefill and deep decode exactly as the model was trained.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"path = {repo or '<this folder>'!r}",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        'messages = [{"role": "user", "content": "What is the capital of France?"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64)",
        "```",
        "",
        "A plain full-depth model on purpose: `from_pretrained(path, trust_remote_code=True, speed_k=None)` "
        f"(the same weights, every layer over every token; not how it was trained when K < {L}). Without "
        "`trust_remote_code`, transformers asks whether to run this folder's code ([y/N], 15 s in a terminal) "
        'and without a yes refuses ("contains custom code") rather than silently running full depth.',
        "Serve it over an OpenAI-compatible API: `python -m speed_train.serve <this folder>`.",
        "Chat in a terminal: `python -m speed_train.chat <this folder>`.",
        "",
    ]


def _use_with_speed_train(k: int) -> list[str]:
    return [
        "This folder is a plain HF checkpoint (the `system` anchor needs the chat template's message "
        "boundaries, which a model served from token ids cannot see): loaded with transformers alone it runs "
        "at full depth, not as trained. Run it under SPEED with speed-train:",
        "",
        "## Use",
        "",
        "```bash",
        "python -m speed_train.chat <this folder>        # K and the anchor from config.json",
        "python -m speed_train.eval --model <this folder>",
        "```",
        "",
        f"From Python: `speed_train.speed.generate.speed_generate(model, prompts, {k})` with prompts from "
        "`speed_train.speed.chat_roles.encode_generation_prompt`.",
        "",
    ]


def is_gemma(cfg: DictConfig, config) -> bool:
    """Gemma weights (the packaged Gemma-3-270M or a Gemma-3 checkpoint), which Google's Gemma terms
    govern; a random-init model of the architecture holds none."""
    from speed_train.speed.adapters import architecture

    return architecture(config) == "gemma3" and cfg.model.source != "tiny"


def gemma_terms() -> list[str]:
    from speed_train.assets import GEMMA_NOTICE, GEMMA_TERMS_FILE

    return [
        "## License: Gemma terms",
        "",
        f"{GEMMA_NOTICE}. This model is a Model Derivative of Gemma; its use and redistribution are "
        f"subject to those terms, including the Prohibited Use Policy (a copy: `{GEMMA_TERMS_FILE}`, "
        "where the installed asset provides it).",
        "",
    ]


def model_card(
    cfg: DictConfig, config, speed: SpeedConfig, result: Any | None, repo: str | None, hf_native: bool = True
) -> str:
    """The export's README: ``speed`` is the exported settings (K as a layer count), ``cfg`` the
    run's config for the training table."""
    L = config.num_hidden_layers
    k = speed.resolve_k(L)
    gemma = is_gemma(cfg, config)
    base = cfg.model.pretrained or cfg.model.name
    what = "Full-IT (full depth)" if k >= L else f"SPEED-{k}" + ("+BoS" if str(speed.anchor) == "bos" else "")
    tags = ["speed", "shallow-prefill", "text-generation"]
    lines = [
        "---",
        *(["license: gemma"] if gemma else []),
        "library_name: transformers",
        f"base_model: {base}" if cfg.model.source == "hub" else f"# base model: {base} ({cfg.model.source})",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {what} of {base}",
        "",
        f"Trained with [speed-train](https://github.com/) (SPEED: Shallow Prefill, dEEp Decode): prompt tokens "
        f"run through the lower {k} of {L} layers only; the anchor ({speed.anchor}), the assistant header and the "
        "response run through all of them.",
        "",
        *(_use_hf_native(repo, L) if hf_native else _use_with_speed_train(k)),
        *(gemma_terms() if gemma else []),
        "## SPEED settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| cutoff K | {k} of {L} layers |",
        f"| anchor | {speed.anchor} |",
        f"| add_bos | {speed.add_bos} |",
        f"| loss scope | {speed.loss_scope} |",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| data recipe | `{cfg.data.recipe}` (max length {cfg.data.max_length}) |",
        f"| fine-tuning | {'LoRA r=' + str(cfg.lora.r) if cfg.lora.enabled else 'full'} |",
        f"| optimizer | AdamW, lr {cfg.optim.lr}, {cfg.optim.schedule} schedule, warm-up {cfg.optim.warmup_ratio} |",
        f"| batch | {cfg.trainer.global_batch_size} rows per step, micro-batch {cfg.trainer.micro_batch_size} |",
        f"| objective | {cfg.objective.kind}, reduce {cfg.objective.reduce} |",
        f"| precision | {cfg.trainer.precision} |",
    ]
    if result is not None:
        lines += [f"| optimizer steps | {result.global_step} |", ""]
        rows = [(label, result.heldout[key]) for label, key in heldout_rows(result) if key in result.heldout]
        if rows:
            lines += ["## Held-out decode-token loss", "", "| model | loss | ppl |", "|---|---|---|"]
            lines += [f"| {label} | {v:.4f} | {math.exp(v):.2f} |" for label, v in rows]
            lines.append("")
    lines += [
        "## Efficiency (by the formulas speed-train's benchmarks check)",
        "",
        "| context | active KV vs full depth | prefill FLOPs vs full depth |",
        "|---|---|---|",
    ]
    for context in (8192, 32768, 131072):
        s = inference_saving(config, k, context)
        lines.append(f"| {context:,} | {s['kv_ratio']:.3f} | {s['prefill_flop_ratio']:.3f} |")
    lines += ["", "## Training config", "", "```yaml", OmegaConf.to_yaml(_plain(cfg)).rstrip(), "```", ""]
    return "\n".join(lines)


def heldout_rows(r) -> list[tuple[str, str]]:
    """(label, heldout key) of the held-out table, named for what the run trained (``r``: a run
    result with ``k``, ``num_layers`` and ``full_it``)."""
    k, n = r.k, r.num_layers
    if r.full_it:
        return [
            ("full depth (before training)", "heldout_full_depth"),
            (f"Full-IT after training (full depth, {n}/{n} layers)", "heldout_after"),
        ]
    return [
        ("full depth (before training)", "heldout_full_depth"),
        (f"SPEED-{k} zero-shot (before training)", "heldout_speed_zero_shot"),
        (f"SPEED-{k} after training (served: shallow prefill)", "heldout_after"),
        ("same weights at full depth (after training)", "heldout_after_full_depth"),
    ]


def _plain(cfg: DictConfig) -> DictConfig:
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    container.pop("output_dir", None)
    return OmegaConf.create(container)
