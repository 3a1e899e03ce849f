"""Turn a saved HF checkpoint into an HF-native SPEED model folder.

``make_hf_native(folder, ...)`` rewrites ``config.json`` (``model_type`` ``speed_<arch>``,
``auto_map`` to the code files, the SPEED keys), copies the code files of
``speed_train/speed`` that the model class needs (the transitive closure of its relative
imports, byte for byte), and saves the tokenizer so that it produces what the model was trained
on: its chat template emits the BoS when the ``add_bos`` rule prepends one, and plain text gets
the BoS by default when the rule puts one on plain prompts (``speed_train.speed.roles``).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import speed_train.speed as speed_pkg
from speed_train.atomic import write_json
from speed_train.speed.adapters import architecture
from speed_train.speed.chat_roles import default_end_token_ids, encode_generation_prompt
from speed_train.speed.config import SpeedConfig
from speed_train.speed.hf_model import SPEED_CLASSES, speed_config_fields
from speed_train.speed.plain_roles import cue_token_sequences
from speed_train.speed.roles import (
    DECODE,
    RoleError,
    bos_prefix,
    plain_adds_bos,
    tokenizer_adds_bos,
)
from speed_train.speed.token_roles import TokenRoleRule

MODEL_FILE = "hf_model.py"
_RELATIVE = re.compile(r"^\s*from \.(\w+) import", re.MULTILINE)


def code_files() -> list[Path]:
    """hf_model.py and every core module it imports, directly or not (relative imports)."""
    root = Path(speed_pkg.__file__).parent
    todo, seen = [MODEL_FILE], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        todo += [f"{m}.py" for m in _RELATIVE.findall((root / name).read_text(encoding="utf-8"))]
    return [root / name for name in sorted(seen)]


def decode_markers(tokenizer: Any, anchor: str) -> TokenRoleRule:
    """What marks the decode phase of a prompt, as token ids, from the package's own encoders:
    the assistant header(s) of the chat template (first and later turns), the answer cues.
    ``tokenizer`` is the served one: its template already has the BoS the rule puts there."""
    headers: list[list[int]] = []
    cfg = SpeedConfig(anchor="none", add_bos=False)
    if getattr(tokenizer, "chat_template", None):
        histories = [
            [{"role": "user", "content": "Hi."}],
            [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "And?"},
            ],
        ]
        for history in histories:
            try:
                ex = encode_generation_prompt(history, tokenizer, cfg)
            except RoleError:
                continue
            turn = ex.turns[-1]
            header = [t for t, r, j in zip(ex.input_ids, ex.roles, ex.turns) if r == DECODE and j == turn]
            if header and header not in headers:
                headers.append(header)
    return TokenRoleRule(
        anchor=anchor,
        headers=headers,
        cues=cue_token_sequences(tokenizer),
        end_ids=default_end_token_ids(tokenizer),
    )


def served_tokenizer(tokenizer: Any, add_bos) -> Any:
    """A copy of the tokenizer that gives what the model was trained and evaluated on."""
    tok = copy.deepcopy(tokenizer)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        probe = tok.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=True, add_generation_prompt=True
        )
        ids = probe["input_ids"] if isinstance(probe, dict) or hasattr(probe, "keys") else probe
        if bos_prefix(tok, add_bos, ids[0] if ids else None):
            tok.chat_template = "{{- bos_token }}" + template
    if plain_adds_bos(tok, add_bos) and not tokenizer_adds_bos(tok):
        from tokenizers import processors

        bos = tok.bos_token
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
        )
    return tok


def make_hf_native(folder: Path, tokenizer: Any, speed: SpeedConfig) -> dict:
    """Rewrite the checkpoint in ``folder`` (config.json + weights, written by save_pretrained)
    into an HF-native SPEED model with the settings ``speed``; saves the served tokenizer there.
    Returns the SPEED keys."""
    add_bos = speed.add_bos
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = architecture(SimpleNamespace(model_type=config.get("model_type")))
    if base not in SPEED_CLASSES:
        raise ValueError(
            f"no HF-native SPEED class for model_type {config.get('model_type')!r}; supported: "
            f"{', '.join(SPEED_CLASSES)}"
        )
    tok = served_tokenizer(tokenizer, add_bos)
    rule = decode_markers(tok, "none" if speed.anchor == "none" else "bos")
    config_cls, model_cls = SPEED_CLASSES[base]
    fields = speed_config_fields(speed, config["num_hidden_layers"], rule)
    config.update(fields)
    config["model_type"] = config_cls.model_type
    config["architectures"] = [model_cls.__name__]
    module = MODEL_FILE.removesuffix(".py")
    config["auto_map"] = {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
    }
    write_json(config_path, config)
    for f in code_files():
        shutil.copyfile(f, folder / f.name)
    tok.save_pretrained(folder)
    return fields
