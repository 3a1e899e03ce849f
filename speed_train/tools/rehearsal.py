"""The paper run, rehearsed end to end on a CPU machine: ``make rehearsal``.

    python -m speed_train.tools.rehearsal                 # the full rehearsal (minutes)
    python -m speed_train.tools.rehearsal --short         # the form the test suite runs

It runs ``+experiment=speed24_bos`` unchanged except for what a CPU machine must swap:

- model: ``llama31_8b_mini`` (random init, Llama-3.1's 32 layers and shape ratios, the real
  Llama-3 tokenizer and the Tulu template, as the 8B run uses);
- data: a local Tulu-3-format file (rows ``{id, messages, source}``, as
  ``allenai/tulu-3-sft-mixture``) made from the packaged chat data, preprocessed with 2 processes;
- hardware: 2 CPU processes (torchrun, gloo), fp32, ZeRO-3 as configured;
- length and batch: 6 optimizer steps of 32 conversations, checkpoints every 2 steps, validation
  every 3 (the short form: 2 steps of 8, a checkpoint after each, validation at the end).

Then, checking each: the first example's roles (the anchor must be ``<|begin_of_text|>``); an
uninterrupted reference run; the same run killed hard (SIGKILL) after a checkpoint and resumed
with the same command, whose losses must equal the reference's; the held-out table (computed
sharded on the ranks); the consolidated export, reloaded and generating under SPEED. Exit status
0 when every check holds, 1 otherwise (the failing check is named).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from speed_train.cli import ArgumentParser

EXPERIMENT = "speed24_bos"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m speed_train.tools.rehearsal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="outputs/rehearsal", help="work folder (replaced)")
    p.add_argument("--short", action="store_true", help="the test suite's form: fewer, smaller steps")
    p.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tulu_format_data(folder: Path) -> Path:
    """The packaged chat conversations as a Tulu-3-format JSONL file and a recipe for it."""
    from speed_train.data.recipes import load_conversations

    train, held, _ = load_conversations("packaged_chat", dedup_held_out=False)  # every conversation
    convs = [row for split in (train, held) for row in split]  # {"messages", "source"}
    rows = [
        {"id": f"packaged_{i}", "messages": c["messages"], "source": c["source"]} for i, c in enumerate(convs)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tulu_format.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipe = folder / "rehearsal_recipe.yaml"
    recipe.write_text(
        "# Tulu-3-format rows {id, messages, source} from the packaged chat data\n"
        "name: rehearsal_tulu_format\n"
        f"sources:\n  - {{name: packaged_as_tulu, path: {data.name}, format: messages}}\n"
        "held_out: 64\nseed: 0\nmax_bad_fraction: 0.05\n",
        encoding="utf-8",
    )
    return recipe


# (steps, conversations a step, checkpoint every, validation every, killed after the checkpoint of)
FULL = (6, 32, 2, 3, 2)
SHORT = (2, 8, 1, 2, 1)


def overrides(recipe: Path, run_dir: Path, cache: Path, short: bool) -> list[str]:
    # a CPU must swap the batch too: 128 conversations a step (64 micro-batches per rank, each a
    # ZeRO-3 gather over gloo) would take about a minute a step here
    steps, batch, every, val, _ = SHORT if short else FULL
    return [
        f"+experiment={EXPERIMENT}",
        "model=llama31_8b_mini",
        f"data.recipe={recipe}",
        "data.num_proc=2",
        f"data.cache_dir={cache}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"trainer.max_steps={steps}",
        f"trainer.global_batch_size={batch}",
        f"trainer.checkpoint_every_n_steps={every}",
        f"trainer.eval_every_n_steps={val}",
        "trainer.progress_bar=false",
        "logger.mode=offline",
        f"hydra.run.dir={run_dir}",
    ]


def launch(
    args: list[str], *, log: Path, timeout: int, kill_after_checkpoint: Path | None = None
) -> subprocess.CompletedProcess:
    """Two CPU ranks under torchrun (as scripts/torchrun.sh starts them), their output in ``log``.
    With ``kill_after_checkpoint``, SIGKILL the whole process group once that checkpoint is
    complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "speed_train",
        *args,
    ]
    return run_logged(cmd, env=env, log=log, timeout=timeout, kill_after_checkpoint=kill_after_checkpoint)


def run_logged(
    cmd: list[str], *, env: dict, log: Path, timeout: int, kill_after_checkpoint: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its output in ``log``; stop it at ``timeout`` or, with
    ``kill_after_checkpoint``, SIGKILL it once that checkpoint is complete."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # A file, not a pipe: this loop does not read while it polls, and a full pipe buffer (64 KiB
    # of rank output) would block both ranks in a write. Its own session: a timeout or the hard
    # kill reaches the launcher and both ranks.
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if kill_after_checkpoint is not None and (kill_after_checkpoint / "COMPLETE").is_file():
                kill_tree(proc.pid)  # hard: no handler, no cleanup, like a node failure
                break
            if time.monotonic() > deadline:
                kill_tree(proc.pid)
                proc.wait()
                raise RuntimeError(f"the run took more than {timeout} s and was stopped:\n{_tail(log)}")
            time.sleep(0.2)
        proc.wait()
    out = log.read_text(errors="replace")
    if kill_after_checkpoint is not None and not (kill_after_checkpoint / "COMPLETE").is_file():
        raise RuntimeError(f"the run ended before {kill_after_checkpoint.name} was complete:\n{_tail(log)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] + f"\n(whole output: {log})"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its ranks in sessions of their own,
    so killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Check:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
        if not ok:
            self.failed.append(what)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import shutil

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cache = out / "data_cache"
    check = Check()
    t0 = time.perf_counter()

    print(
        f"1. data: packaged chat as a Tulu-3-format file, +experiment={EXPERIMENT} on llama31_8b_mini",
        flush=True,
    )
    recipe = write_tulu_format_data(out / "data")
    first = first_example_roles(recipe, cache)
    print(first["rendered"])
    check(
        first["first_token"] == "<|begin_of_text|>" and first["first_role"] == "anchor",
        f"token 0 is the anchor and is <|begin_of_text|> (got {first['first_token']!r}, {first['first_role']})",
    )
    check(first["bos_count"] == 1, f"exactly one BoS in the first example (got {first['bos_count']})")

    print("2. reference run (2 ranks, ZeRO-3, uninterrupted)", flush=True)
    ref_dir = out / "reference"
    ref = launch(
        overrides(recipe, ref_dir, cache, args.short), log=out / "reference.log", timeout=args.timeout
    )
    check(ref.returncode == 0, f"reference run exits 0 (got {ref.returncode})")
    if ref.returncode != 0:
        print(ref.stdout[-6000:])
        return _finish(check, t0)
    reference = json.loads((ref_dir / "results.json").read_text())

    kill_step = (SHORT if args.short else FULL)[4]
    print(
        f"3. the same run, killed hard after the step-{kill_step} checkpoint, then the same command again",
        flush=True,
    )
    run_dir = out / "run"
    launch(
        overrides(recipe, run_dir, cache, args.short),
        log=out / "killed.log",
        timeout=args.timeout,
        kill_after_checkpoint=run_dir / "checkpoints" / f"step={kill_step}.ckpt",
    )
    check(not (run_dir / "results.json").exists(), "the killed run left no results")
    resumed = launch(
        overrides(recipe, run_dir, cache, args.short), log=out / "resumed.log", timeout=args.timeout
    )
    check(resumed.returncode == 0, f"the resumed run exits 0 (got {resumed.returncode})")
    if resumed.returncode != 0:
        print(resumed.stdout[-6000:])
        return _finish(check, t0)
    result = json.loads((run_dir / "results.json").read_text())
    check(
        str(result["resumed_from"]).endswith(f"step={kill_step}.ckpt"),
        f"resumed from step {kill_step} ({result['resumed_from']})",
    )
    check(
        result["step_losses"] == reference["step_losses"],
        f"losses identical to the uninterrupted run: {result['step_losses']}",
    )
    check(result["val_losses"] == reference["val_losses"], f"validation identical: {result['val_losses']}")
    check(result["zero3_partitioned_at_construction"] is True, "the model was built ZeRO-3-partitioned")

    print("4. held-out table (sharded over the 2 ranks, on their devices, before consolidation)", flush=True)
    for key in ("heldout_full_depth", "heldout_speed_zero_shot", "heldout_after", "heldout_after_full_depth"):
        check(key in result and result[key] == result[key], f"{key} = {result.get(key)}")
    check(
        result["heldout_after"] < result["heldout_speed_zero_shot"],
        "training lowered the SPEED held-out loss",
    )

    print("5. the consolidated export, reloaded, generating under SPEED", flush=True)
    gen = reload_and_generate(Path(result["export"]["model"]))
    print(f"  generated ids: {gen['tokens']}")
    check(
        gen["prompt_starts_with_bos"], "the generation prompt starts with <|begin_of_text|> (the BoS anchor)"
    )
    check(gen["matches_teacher_forced"], "SPEED generation == the argmax of the teacher-forced SPEED forward")
    return _finish(check, t0)


def _finish(check: Check, t0: float) -> int:
    minutes = (time.perf_counter() - t0) / 60
    if check.failed:
        print(
            f"\nrehearsal FAILED ({len(check.failed)} checks, {minutes:.1f} min): {'; '.join(check.failed)}"
        )
        return 1
    print(f"\nrehearsal passed ({minutes:.1f} min)")
    return 0


def first_example_roles(recipe: Path, cache: Path) -> dict:
    """The first training example of the run's data, with its roles (as the data inspector shows)."""
    from hydra import compose, initialize_config_module

    from speed_train.data.pipeline import build_dataset
    from speed_train.speed.roles import ROLE_NAMES
    from speed_train.tools.inspect_roles import render_roles
    from speed_train.train.build import load_tokenizer, speed_config
    from speed_train.train.schema import register_schema

    register_schema()
    with initialize_config_module(config_module="speed_train.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"+experiment={EXPERIMENT}", "model=llama31_8b_mini"])
    tok = load_tokenizer(cfg)
    train, _, report = build_dataset(recipe, tok, speed_config(cfg), cfg.data.max_length, cache, num_proc=2)
    ex = train[0]
    return {
        "rendered": render_roles(ex, tok, color=False),
        "first_token": tok.convert_ids_to_tokens(ex.input_ids[0]),
        "first_role": ROLE_NAMES[ex.roles[0]],
        "bos_count": ex.input_ids.count(tok.bos_token_id),
        "report": report.summary(),
    }


def reload_and_generate(model_dir: Path) -> dict:
    """Load the export as any user would and generate under SPEED; compare with the teacher-forced
    SPEED forward of the generated sequence (the exactness the package guarantees)."""
    import torch

    from speed_train.loading import load_model
    from speed_train.speed.batch import collate
    from speed_train.speed.chat_roles import encode_generation_prompt
    from speed_train.speed.config import SpeedConfig
    from speed_train.speed.executors import mask_forward
    from speed_train.speed.generate import speed_generate
    from speed_train.speed.roles import DECODE, EncodedExample

    model, tok = load_model(str(model_dir))
    cfg = SpeedConfig.from_pretrained(model_dir)
    prompt = encode_generation_prompt(
        [{"role": "user", "content": "What is the capital of France?"}], tok, cfg
    )
    out = speed_generate(model, [prompt], cfg.k, max_new_tokens=6, keep_logits=True)
    tokens = out.sequences[0]
    full = EncodedExample(
        prompt.input_ids + tokens,
        prompt.roles + [DECODE] * len(tokens),
        prompt.turns + [prompt.turns[-1]] * len(tokens),
        [-100] * (len(prompt) + len(tokens)),
    )
    with torch.no_grad():
        tf = mask_forward(model, collate([full], tok.pad_token_id), cfg.k).dense((1, len(full)))[0]
    steps = tf[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].argmax(-1).tolist()
    return {
        "tokens": tokens,
        "prompt_starts_with_bos": prompt.input_ids[0] == tok.bos_token_id,
        "matches_teacher_forced": steps == tokens,
    }


if __name__ == "__main__":
    sys.exit(main())
