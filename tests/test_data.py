"""User datasets (`rlhf_zoo.data`): reading files, row schemas of every format, token checks with the task's
tokenizer, the raise / drop / truncate policies and their report, property-based checks over random rows
and configs, and the command line (``zoo run dpo --dataset FILE``)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_zoo.cli import main
from rlhf_zoo.config import DatasetConfig
from rlhf_zoo.data import (
    HH_MARKER,
    LengthCaps,
    Ranking,
    RowPolicy,
    length_caps,
    numbered,
    read_rows,
    validate_rankings,
    validate_sft,
)
from rlhf_zoo.errors import ConfigError, DataError
from rlhf_zoo.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, get_registry
from rlhf_zoo_plugins.dpo import DPOConfig, load_pairs, load_pairs_with_report
from rlhf_zoo_plugins.reward_model import RewardModelConfig
from rlhf_zoo_plugins.sft import SFTConfig

FIXTURES = Path(__file__).parent / "fixtures" / "data"
OK = {"prompt": "x y", "chosen": "x", "rejected": "y z"}
DROP = RowPolicy(bad_rows="drop", long_rows="drop", max_drop_fraction=1.0)


def rankings(rows, options=RowPolicy(), **kw):
    return validate_rankings(numbered(rows), options, source="data.jsonl", **kw)


def error(rows, options=RowPolicy(), validate=validate_rankings, **kw) -> str:
    with pytest.raises(DataError) as info:
        validate(numbered(rows), options, source="data.jsonl", **kw)
    return str(info.value)


# --- reading files --------------------------------------------------------------------------------------
def test_read_rows_numbers_are_line_numbers_and_unreadable_lines_are_rows():
    rows = read_rows(FIXTURES / "bad_lines.jsonl")
    assert [n for n, _ in rows] == [1, 3, 4, 5]  # line 2 is blank
    assert error([]) == "data.jsonl: the dataset has no rows"
    with pytest.raises(DataError, match=r"^bad_lines\.jsonl row 3: invalid JSON \(Expecting property name"):
        validate_rankings(rows, source="bad_lines.jsonl")
    kept, report = validate_rankings(rows, DROP, source="bad_lines.jsonl")
    assert kept == [Ranking("x", ["x", "y"], [0.0]), Ranking("y", ["z", "x"], [0.0])]
    assert dict(report.dropped) == {"invalid_json": 1, "not_an_object": 1}
    assert report.first_dropped["not_an_object"].startswith("row 4: expected an object with keys prompt")


def test_read_rows_non_utf8_line_is_a_bad_row(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(OK).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^latin\.jsonl row 2: not UTF-8 text \(byte 0xe9 at column 16\)$"):
        validate_rankings(read_rows(path), source="latin.jsonl")


def test_read_rows_json_parquet_and_saved_directory_agree(tmp_path):
    import datasets

    rows = [{**OK, "margin": None}, {"prompt": "z", "chosen": "y", "rejected": "x", "margin": 0.5}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)  # a null optional value is an absent key
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    expected = [Ranking("x y", ["x", "y z"], [0.0]), Ranking("z", ["y", "x"], [0.5])]
    for name in ("d.json", "d.parquet", "saved"):
        assert validate_rankings(read_rows(tmp_path / name))[0] == expected, name


@pytest.mark.parametrize(("name", "content", "message"), [
    ("list.json", '{"prompt": "x"}', "list.json: expected a JSON list of objects, got dict"),
    ("lines.json", '{"a": 1}\n{"a": 2}', "lines.json: invalid JSON at line 2 (Extra data); one object per line is a .jsonl file"),
    ("data.csv", "a,b", "dataset data.csv: unknown format '.csv'; use .jsonl, .json, .parquet or a directory saved by datasets' save_to_disk"),
    ("bad.parquet", "not parquet", "bad.parquet: cannot be read as parquet"),
])
def test_read_rows_unreadable_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        read_rows(tmp_path / name)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_read_rows_directories(tmp_path):
    import datasets

    with pytest.raises(DataError, match=r"^dataset 'nope.jsonl' does not exist \(not a file or directory, nor a "
                                        r"Hugging Face Hub dataset id"):
        read_rows("nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^dataset directory empty: not a dataset saved by datasets' save_to_disk"):
        read_rows(tmp_path / "empty")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([OK])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"^dataset directory dd holds the splits train; pass one split's directory \(e\.g\. dd/train\)$"):
        read_rows(tmp_path / "dd")


# --- row schemas ----------------------------------------------------------------------------------------
BAD_RANKING_ROWS = [
    ({"prompt": "x", "rejected": "y"}, "missing_key", "key 'chosen' is missing"),
    ({"chosen": "x", "rejected": "y"}, "missing_key", "key 'prompt' is missing"),
    ({"prompt": "x", "chosen": None, "rejected": "y"}, "missing_key", "key 'chosen' is null"),
    ({"prompt": 3, "chosen": "x", "rejected": "y"}, "wrong_type", "key 'prompt' must be a string, got int"),
    ({"prompt": "x", "chosen": ["x"], "rejected": "y"}, "wrong_type",
     "key 'chosen'[0] must be a message {'role': str, 'content': str}, got x"),
    ({"prompt": "x", "chosen": 3, "rejected": "y"}, "wrong_type", "key 'chosen' must be a string, got int"),
    ({"prompt": "x", "chosen": "x", "rejected": " \t"}, "empty", "key 'rejected' is empty"),
    ({"prompt": "", "chosen": "x", "rejected": "y"}, "empty", "key 'prompt' is empty"),
    ({"prompt": "x", "chosen": "y", "rejected": "y"}, "identical", "keys 'chosen' and 'rejected' are identical"),
    ({"prompt": "x", "chosen": "x", "rejected": "y", "margin": "big"}, "wrong_type", "key 'margin' must be a finite number, got 'big'"),
    ({"prompt": "x", "chosen": "x", "rejected": "y", "margin": True}, "wrong_type", "key 'margin' must be a finite number, got True"),
    ({"prompt": "x", "chosen": "x", "rejected": "y", "margin": math.inf}, "wrong_type", "key 'margin' must be a finite number, got inf"),
    ({"prompt": "x", "responses": "x y"}, "wrong_type", "key 'responses' must be a list of strings, got str"),
    ({"prompt": "x", "responses": ["x"]}, "wrong_length", "key 'responses' must hold at least 2 responses, got 1"),
    ({"prompt": "x", "responses": ["x", 5]}, "wrong_type", "key 'responses'[1] must be a string, got int"),
    ({"prompt": "x", "responses": ["x", ""]}, "empty", "key 'responses'[1] is empty"),
    ({"prompt": "x", "responses": ["x", "y", "x"]}, "identical", "keys 'responses'[0] and 'responses'[2] are identical"),
    ({"prompt": "x", "responses": ["x", "y", "z"], "margins": [1, 2]}, "wrong_length",
     "key 'margins' must hold C(K,2) = 3 numbers for 3 responses, got 2"),
    ({"prompt": "x", "responses": ["x", "y"], "margins": ["a"]}, "wrong_type", "key 'margins'[0] must be a finite number, got 'a'"),
    ("x y", "not_an_object", "expected an object with keys prompt and chosen/rejected or responses, got str"),
]


@pytest.mark.parametrize(("row", "reason", "message"), BAD_RANKING_ROWS)
def test_bad_ranking_row_raises_naming_row_and_key_or_is_dropped_and_counted(row, reason, message):
    rows = [OK, row, OK]
    assert error(rows) == f"data.jsonl row 2: {message}"
    kept, report = rankings(rows, DROP)
    assert kept == [Ranking("x y", ["x", "y z"], [0.0])] * 2
    assert (report.rows, report.kept, dict(report.dropped)) == (3, 2, {reason: 1})
    assert report.first_dropped == {reason: f"row 2: {message}"}


def test_ranked_responses_and_pairs_may_share_a_file():
    kept, report = rankings([{"prompt": "x", "responses": ["x", "y", "z"], "margins": [1, 2.5, 0]}, OK])
    assert kept == [Ranking("x", ["x", "y", "z"], [1.0, 2.5, 0.0]), Ranking("x y", ["x", "y z"], [0.0])]
    assert report.format == "prompt/chosen/rejected+prompt/responses"


def test_extra_keys_are_ignored():
    assert rankings([{**OK, "source": 3, "level": None}])[0] == [Ranking("x y", ["x", "y z"], [0.0])]


def test_sft_rows():
    rows = [{"prompt": "x", "completion": "y"}, {"prompt": "x"}, {"prompt": "x", "completion": 1}]
    assert error(rows, validate=validate_sft) == "data.jsonl row 2: key 'completion' is missing"
    kept, report = validate_sft(numbered(rows), DROP)
    assert kept == [("x", "y")]
    assert dict(report.dropped) == {"missing_key": 1, "wrong_type": 1}
    assert report.metrics()["dataset"]["format"] == "prompt/completion"


@pytest.mark.parametrize(("validate", "rows", "message"), [
    (validate_rankings, [{"text": "x"}, 5], "data.jsonl: no row has the keys of a ranking format (row 1 has keys 'text'); "
     "accepted: prompt/chosen/rejected[/margin], prompt/responses[/margins] (best first) or Anthropic HH chosen/rejected text"),
    (validate_rankings, [{"prompt": "x", "completion": "y"}], "data.jsonl: no row has the keys of a ranking format "
     "(row 1 has keys 'prompt', 'completion'); accepted: "),
    (validate_sft, [{"prompt": "x", "chosen": "x", "rejected": "y"}], "data.jsonl: no row has the keys of an SFT "
     "format (row 1 has keys 'prompt', 'chosen', 'rejected'); accepted: prompt/completion"),
])
def test_unknown_format_names_the_accepted_ones(validate, rows, message):
    assert error(rows, DROP, validate=validate).startswith(message)


@pytest.mark.parametrize(("content", "first"), [
    ('{"prompt": "a b", "chosen": "c"\n', "row 1: invalid JSON (Expecting ',' delimiter at column 32)"),
    ("[1, 2]\n3\n", "row 1 is a list, not an object"),
])
def test_a_file_of_no_objects_names_its_first_row(tmp_path, content, first):
    """Every line broken (or none an object): the error says what row 1 is, not only that keys are missing."""
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        validate_rankings(read_rows(path), DROP, source="data.jsonl")
    assert str(e.value).startswith(f"data.jsonl: no row has the keys of a ranking format ({first}); accepted: ")


# --- Anthropic HH text ----------------------------------------------------------------------------------
def test_hh_text_prompt_is_the_shared_dialogue_up_to_the_last_assistant_turn():
    kept, report = validate_rankings(read_rows(FIXTURES / "hh.jsonl"))
    assert report.format == "anthropic-hh"
    assert kept[0] == Ranking("\n\nHuman: x y\n\nAssistant:", [" x", " y z"], [0.0])
    assert kept[1].prompt == "\n\nHuman: z\n\nAssistant: x\n\nHuman: y\n\nAssistant:"
    assert kept[1].responses == [" z z", " y"]
    assert all(r.prompt + r.responses[0] == json.loads(line)["chosen"]
               for r, line in zip(kept, (FIXTURES / "hh.jsonl").read_text().splitlines(), strict=True))


@pytest.mark.parametrize(("row", "reason", "message"), [
    ({"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "hh_format",
     r"key 'chosen' has no '\n\nAssistant:' turn (a file without 'prompt' keys is read as Anthropic HH text; accepted: "),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: x"}, "hh_format",
     r"keys 'chosen' and 'rejected' do not share the dialogue up to their last '\n\nAssistant:'"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: "}, "empty",
     "key 'rejected' has an empty last Assistant turn"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "identical",
     "keys 'chosen' and 'rejected' are identical"),
    ({"rejected": "\n\nHuman: x\n\nAssistant: y"}, "missing_key", "key 'chosen' is missing"),
])
def test_hh_text_bad_rows(row, reason, message):
    good = {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"}
    msg = error([good, row])
    assert msg.startswith(f"data.jsonl row 2: {message}") and "\n" not in msg
    assert dict(rankings([good, row], DROP)[1].dropped) == {reason: 1}


# --- tokens: unknown words and length caps (the exact task: words x y z, 16 positions, 4-token responses) --
def test_length_caps_of_the_exact_task(exact_task):
    assert length_caps(exact_task, 4) == LengthCaps(prompt=11, response=4)
    assert length_caps(exact_task, 6) == LengthCaps(prompt=9, response=6)
    assert length_caps(object(), 4) == LengthCaps(prompt=None, response=4)  # no model config: no prompt cap


def test_unknown_prompt_and_response_words_are_bad_rows_under_their_own_reasons(exact_task):
    tok, caps = exact_task.tokenizer, length_caps(exact_task, 4)
    rows = [{"prompt": "x", "chosen": "x hello", "rejected": "y"}, {"prompt": "hello x", "chosen": "x", "rejected": "y"},
            {"prompt": "x y", "chosen": "x", "rejected": "y"}]
    assert error(rows, tokenizer=tok, caps=caps) == ("data.jsonl row 1: key 'chosen' has words the tokenizer "
                                                     "does not know ('hello'); the policy can never generate them")
    assert error(rows[1:], tokenizer=tok, caps=caps) == (
        "data.jsonl row 1: key 'prompt' has words the tokenizer does not know ('hello'); the model would read "
        "them all as one unknown token")
    kept, report = rankings(rows, DROP, tokenizer=tok, caps=caps)
    assert [r.prompt for r in kept] == ["x y"]
    assert dict(report.dropped) == {"unknown_token": 1, "unknown_prompt_token": 1}


LONG = [{"prompt": "x", "chosen": "x y z x y", "rejected": "y"},  # 5 response tokens > 4
        {"prompt": "x y z x y z x y z x y z", "chosen": "x", "rejected": "y"},  # 12 prompt tokens > 11
        {"prompt": "y", "responses": ["x y z x", "y", "z z z z z"]}]  # 4 is the cap itself: kept whole


def test_long_rows_raise(exact_task):
    tok, caps = exact_task.tokenizer, length_caps(exact_task, 4)
    assert error(LONG, RowPolicy(long_rows="raise"), tokenizer=tok, caps=caps) == (
        "data.jsonl row 1: key 'chosen' is 5 tokens, over the response cap of 4 (max_new_tokens); set long_rows to "
        "truncate or drop to go on")
    assert error(LONG[1:], RowPolicy(long_rows="raise"), tokenizer=tok, caps=caps) == (
        "data.jsonl row 1: key 'prompt' is 12 tokens, over the prompt cap of 11 (the model's positions minus BOS "
        "and max_new_tokens); set long_rows to truncate or drop to go on")


def test_long_rows_truncate_counts_by_key(exact_task, caplog):
    tok, caps = exact_task.tokenizer, length_caps(exact_task, 4)
    kept, report = rankings(LONG, RowPolicy(long_rows="truncate"), tokenizer=tok, caps=caps)
    assert kept[0] == Ranking("x", ["x y z x", "y"], [0.0])  # a response keeps its start
    assert kept[1].prompt == "y z x y z x y z x y z"  # a prompt keeps its end (the context next to the response)
    assert kept[2].responses == ["x y z x", "y", "z z z z"]
    assert report.truncated_rows == 3 and dict(report.truncated) == {"chosen": 1, "prompt": 1, "responses": 1}
    assert report.kept == 3 and not report.dropped
    assert "data.jsonl: truncated 3 rows (chosen 1, prompt 1, responses 1; caps: prompt 11, response 4 tokens)" in caplog.text


def test_long_rows_drop_is_limited_by_max_drop_fraction(exact_task):
    tok, caps = exact_task.tokenizer, length_caps(exact_task, 4)
    rows = LONG[:2] + [OK] * 2
    assert error(rows, RowPolicy(long_rows="drop"), tokenizer=tok, caps=caps) == (
        "data.jsonl: 2 of 4 rows dropped (too_long 2), more than max_drop_fraction 0.1 allows; first: row 1: key "
        "'chosen' is 5 tokens, over the response cap of 4 (max_new_tokens)")
    kept, report = rankings(rows, RowPolicy(long_rows="drop", max_drop_fraction=0.5), tokenizer=tok, caps=caps)
    assert len(kept) == 2 and dict(report.dropped) == {"too_long": 2}


def test_drop_fraction_boundary_and_nothing_left():
    rows = [OK] * 9 + [{"prompt": "x"}]
    assert rankings(rows, RowPolicy(bad_rows="drop"))[1].kept == 9  # 1 of 10 = max_drop_fraction: allowed
    assert "2 of 11 rows dropped (missing_key 2)" in error(rows + [{"prompt": "x"}], RowPolicy(bad_rows="drop"))
    assert error([{"prompt": "x", "rejected": "y"}], DROP) == ("data.jsonl: 1 of 1 row dropped (missing_key 1), none left; first: "
                                              "row 1: key 'chosen' is missing")


def test_same_k_for_the_reward_model():
    rows = [OK, {"prompt": "x", "responses": ["x", "y", "z"]}, OK]
    assert error(rows, same_k=True) == ("data.jsonl row 2: 3 responses (key 'responses') but row 1 has 2; every "
                                        "ranking needs the same number of responses")
    assert dict(rankings(rows, DROP, same_k=True)[1].dropped) == {"k_mismatch": 1}
    assert len(rankings(rows)[0]) == 3  # DPO takes any K


def test_report_metrics_for_the_summary():
    _, report = rankings([OK, {"prompt": "x"}, OK, OK], RowPolicy(bad_rows="drop", max_drop_fraction=0.5),
                         caps=LengthCaps(11, 4))
    assert report.metrics() == {"dataset": {
        "path": "data.jsonl", "format": "prompt/chosen/rejected", "rows": 4, "kept": 3, "dropped": 1,
        "dropped_by_reason": {"missing_key": 1}, "first_dropped": {"missing_key": "row 2: key 'chosen' is missing"},
        "truncated": 0, "truncated_by_key": {}, "prompt_token_cap": 11, "response_token_cap": 4}}
    json.dumps(report.metrics())


def test_dpo_load_pairs_reads_hh_text_and_reports(exact_task):
    cfg = DPOConfig(dataset=str(FIXTURES / "hh.jsonl"))
    pairs, report = load_pairs_with_report(exact_task, cfg)
    assert pairs[0] == ("\n\nHuman: x y\n\nAssistant:", " x", " y z")
    assert report["dataset"]["format"] == "anthropic-hh" and report["dataset"]["kept"] == 2
    assert load_pairs(exact_task, cfg) == pairs
    cfg = DPOConfig(dataset=str(FIXTURES / "missing_chosen.jsonl"), bad_rows="drop")
    pairs, report = load_pairs_with_report(exact_task, cfg)
    assert len(pairs) == 9 and report["dataset"]["dropped_by_reason"] == {"missing_key": 1}


# --- properties over random rows ------------------------------------------------------------------------
KEYS = ("prompt", "chosen", "rejected", "responses", "margin", "margins", "completion")
texts = st.text(alphabet="xyz \t", max_size=6)
values = st.one_of(texts, st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                   st.lists(st.one_of(texts, st.integers(0, 2), st.floats(-1, 1)), max_size=4))
rows_st = st.lists(st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=5), values), min_size=1, max_size=8)
ROW_ERROR = re.compile(r"^data\.jsonl row (\d+): ")
FILE_ERROR = re.compile(r"^data\.jsonl: (no row has the keys of an? .* format|the dataset has no rows)")
KEY_NAMED = re.compile(r"key(s)? '(prompt|chosen|rejected|responses|margin|margins|completion)'")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(rows=rows_st, validate=st.sampled_from([validate_rankings, validate_sft]))
def test_property_random_rows_raise_only_data_errors_naming_row_and_key(rows, validate):
    try:
        validate(numbered(rows), source="data.jsonl")
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg
        if FILE_ERROR.match(msg):
            return
        n = int(ROW_ERROR.match(msg).group(1))
        assert 1 <= n <= len(rows)
        if isinstance(rows[n - 1], dict):
            assert KEY_NAMED.search(msg), msg
        assert all(_valid(validate, r) for r in rows[: n - 1])  # it stops at the first bad row


def _valid(validate, row) -> bool:
    try:
        validate(numbered([row]))
        return True
    except DataError:
        return False


@SETTINGS
@given(rows=rows_st, validate=st.sampled_from([validate_rankings, validate_sft]))
def test_property_drop_counts_every_row(rows, validate):
    try:
        kept, report = validate(numbered(rows), DROP, source="data.jsonl")
    except DataError as e:
        assert FILE_ERROR.match(str(e)) or ", none left; first: row " in str(e)
        return
    assert len(kept) == report.kept == len(rows) - sum(report.dropped.values()) > 0
    assert set(report.dropped) == set(report.first_dropped)


words = st.lists(st.sampled_from("xyz"), min_size=1, max_size=7).map(" ".join)


@st.composite
def valid_rows(draw):
    if draw(st.booleans()):
        chosen = draw(words)
        rejected = draw(words.filter(lambda w: w != chosen))
        return {"prompt": draw(words), "chosen": chosen, "rejected": rejected, "margin": draw(st.floats(0, 3))}
    responses = draw(st.lists(words, min_size=2, max_size=4, unique=True))
    return {"prompt": draw(words), "responses": responses,
            "margins": draw(st.lists(st.floats(0, 3), min_size=math.comb(len(responses), 2),
                                     max_size=math.comb(len(responses), 2)))}


BREAK = {"delete": lambda r, k: {a: b for a, b in r.items() if a != k}, "int": lambda r, k: {**r, k: 7},
         "empty": lambda r, k: {**r, k: "  "}, "null": lambda r, k: {**r, k: None}}


@st.composite
def broken_rows(draw):
    row = draw(valid_rows())
    if "chosen" in row and draw(st.booleans()):
        return {**row, "rejected": row["chosen"]}
    key = draw(st.sampled_from(["prompt", "chosen", "rejected"] if "chosen" in row else ["prompt", "responses"]))
    return BREAK[draw(st.sampled_from(sorted(BREAK)))](row, key)


@SETTINGS
@given(rows=st.lists(st.tuples(st.booleans(), valid_rows(), broken_rows()), min_size=1, max_size=10))
def test_property_drop_never_loses_a_valid_row(rows, exact_task):
    mixed = [good if keep else bad for keep, good, bad in rows]
    tok, caps = exact_task.tokenizer, length_caps(exact_task, 4)
    options = RowPolicy(bad_rows="drop", long_rows="truncate", max_drop_fraction=1.0)
    try:
        kept, report = rankings(mixed, options, tokenizer=tok, caps=caps)
    except DataError as e:
        assert not any(keep for keep, _, _ in rows) and ("none left" in str(e) or FILE_ERROR.match(str(e)))
        return
    expected = [good for keep, good, _ in rows if keep]
    assert report.kept == len(kept) == len(expected) and sum(report.dropped.values()) == len(rows) - len(expected)
    for r, row in zip(kept, expected, strict=True):
        originals = _texts(row)
        assert row["prompt"].endswith(r.prompt)  # truncated prompts keep their end
        assert all(o.startswith(t) and len(t.split()) <= 4 for t, o in zip(r.responses, originals, strict=True))
        assert len(r.prompt.split()) <= 11
    assert report.truncated_rows == sum(any(len(t.split()) > 4 for t in _texts(r)) or len(r["prompt"].split()) > 11
                                        for r in expected)


def _texts(row) -> list[str]:
    return [row["chosen"], row["rejected"]] if "chosen" in row else row["responses"]


@SETTINGS
@given(turns=st.lists(words, min_size=1, max_size=3), a=words, b=words)
def test_property_hh_text_splits_at_the_last_assistant_turn(turns, a, b):
    prompt = "".join(f"\n\nHuman: {t}{HH_MARKER} {t}" for t in turns[:-1]) + f"\n\nHuman: {turns[-1]}{HH_MARKER}"
    rows = [{"chosen": prompt + " " + a, "rejected": prompt + " " + b}]
    if a == b:
        assert error(rows) == "data.jsonl row 1: keys 'chosen' and 'rejected' are identical"
        return
    assert rankings(rows)[0] == [Ranking(prompt, [" " + a, " " + b], [0.0])]


# --- properties over random configs ---------------------------------------------------------------------
def _option_dicts(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    any_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                          st.text(string.ascii_letters + "_.", max_size=8),
                          st.sampled_from(["raise", "drop", "truncate", "sigmoid", "ipo", "sft", "pretrained"]),
                          st.lists(st.integers(), max_size=2))
    return st.dictionaries(st.one_of(st.sampled_from(names), st.text(max_size=6), st.integers()), any_value, max_size=6)


@pytest.mark.parametrize("cls", [DPOConfig, RewardModelConfig, SFTConfig, DatasetConfig])
def test_property_random_options_construct_or_raise_config_error(cls):
    @settings(max_examples=150, deadline=None)
    @given(values=_option_dicts(cls), preset=st.one_of(st.none(), st.sampled_from(["default", "smoke", "quick", "huge"])))
    def check(values, preset):
        try:
            cfg = cls.from_dict(values, preset=preset)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
        assert cls.from_dict(cfg.to_dict()) == cfg

    check()


@pytest.mark.parametrize(("options", "message"), [
    ({"bad_rows": "skip"}, "bad_rows must be of type one of 'raise', 'drop', got 'skip'"),
    ({"long_rows": "cut"}, "long_rows must be of type one of 'raise', 'truncate', 'drop', got 'cut'"),
    ({"max_drop_fraction": 1.5}, "max_drop_fraction must be in [0.0, 1.0], got 1.5"),
    ({"max_drop_fraction": "0.2"}, "max_drop_fraction must be of type float, got '0.2'"),
])
def test_dataset_options_are_validated(options, message):
    for cls in (DPOConfig, RewardModelConfig, SFTConfig):
        with pytest.raises(ConfigError) as info:
            cls.from_dict(options)
        assert str(info.value) == message


def test_dataset_option_defaults():
    cfg = DPOConfig()
    assert (cfg.bad_rows, cfg.long_rows, cfg.max_drop_fraction) == ("raise", "truncate", 0.1)


# --- the command line -----------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_BLOCK, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.chdir(tmp_path)
    get_registry(refresh=True)
    yield tmp_path
    monkeypatch.undo()
    get_registry(refresh=True)


def one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zoo: error: ") and "Traceback" not in out + err
    return lines[0]


RUN = ["run", "dpo", "--task", "exact", "--preset", "smoke", "--device", "cpu", "--quiet"]


def test_cli_dpo_row_missing_chosen_is_one_line_naming_row_and_key(cli, capsys):
    data = FIXTURES / "missing_chosen.jsonl"
    assert main([*RUN, "--dataset", str(data), "--out", str(cli / "r")]) == 1
    assert one_line_error(capsys) == "zoo: error: missing_chosen.jsonl row 2: key 'chosen' is missing"
    assert not (cli / "r" / "summary.json").exists()


def test_cli_dpo_drop_runs_and_reports_the_count(cli, capsys, caplog):
    data = FIXTURES / "missing_chosen.jsonl"
    assert main([*RUN, "--dataset", str(data), "--out", str(cli / "r"), "--bad-rows", "drop"]) == 0
    report = json.loads((cli / "r" / "summary.json").read_text())["dataset"]
    assert (report["rows"], report["kept"], report["dropped"]) == (10, 9, 1)
    assert report["dropped_by_reason"] == {"missing_key": 1}
    assert report["first_dropped"] == {"missing_key": "row 2: key 'chosen' is missing"}
    # a warning (on stderr when logging is not configured, as under `zoo`)
    assert "missing_chosen.jsonl: dropped 1 of 10 rows (missing_key 1; first: row 2: key 'chosen' is missing)" in caplog.text
    capsys.readouterr()
    # above max_drop_fraction the run refuses
    assert main([*RUN, "--dataset", str(data), "--out", str(cli / "r2"), "--bad-rows", "drop",
                 "--max-drop-fraction", "0.05"]) == 1
    assert one_line_error(capsys) == ("zoo: error: missing_chosen.jsonl: 1 of 10 rows dropped (missing_key 1), more "
                                      "than max_drop_fraction 0.05 allows; first: row 2: key 'chosen' is missing")


@pytest.mark.parametrize(("args", "expected"), [
    (["--bad-rows", "skip"], ["'--bad-rows'", "'skip'", "raise", "drop"]),
    (["--long-rows", "cut"], ["'--long-rows'", "'cut'", "truncate"]),
    (["--max-drop-fraction", "lots"], ["'--max-drop-fraction'", "'lots'", "float"]),
    (["--max-drop-fraction", "2"], ["max_drop_fraction must be in [0.0, 1.0], got 2.0"]),
    (["--dataset", "absent.jsonl"], ["--dataset 'absent.jsonl' does not exist"]),
    (["--dataset", "."], ["dataset directory .: not a dataset saved by datasets' save_to_disk"]),
])
def test_cli_bad_dataset_options_are_one_line(cli, capsys, args, expected):
    assert main([*RUN, "--out", str(cli / "r"), *args]) != 0
    line = one_line_error(capsys)
    assert all(e in line for e in expected), line


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"bad_rows": "skip"}', "bad_rows must be of type one of 'raise', 'drop', got 'skip'"),
    (b'{"max_drop_fraction": NaN}', "max_drop_fraction must be a number, got nan"),
    (b'{"dataset": 3}', "dataset must be of type str, got 3"),
    (b'{"beta": 0.1,}', "invalid JSON at line 1"),
    (b'\xff\xfe{"beta": 0.1}', "not UTF-8 text (byte 0xff at offset 0)"),
    (b"", "invalid JSON at line 1: Expecting value"),
])
def test_cli_malformed_config_files_are_one_line(cli, capsys, content, expected):
    path = cli / "cfg.json"
    path.write_bytes(content)
    assert main([*RUN, "--out", str(cli / "r"), "--config", str(path)]) == 1
    assert expected in one_line_error(capsys)


def test_sft_and_reward_model_report_their_dataset(cli, capsys, tmp_path):
    from rlhf_zoo.runner import run

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": "x y", "completion": c}) + "\n" for c in ["x", "y z x y z", "z", "q"]))
    s = run("sft", task="exact", preset="smoke", out=tmp_path / "sft", device="cpu", progress=False,
            options={"dataset": str(sft), "bad_rows": "drop", "max_drop_fraction": 0.25})
    assert s["dataset"]["dropped_by_reason"] == {"unknown_token": 1}
    assert s["dataset"]["truncated_by_key"] == {"completion": 1}
    ranks = tmp_path / "ranks.jsonl"
    ranks.write_text("".join(json.dumps({"prompt": "x", "responses": ["x", "y", "z"]}) + "\n" for _ in range(4))
                     + json.dumps(OK) + "\n")
    s = run("reward-model", task="exact", preset="smoke", out=tmp_path / "rm", device="cpu", progress=False,
            options={"dataset": str(ranks), "bad_rows": "drop", "max_drop_fraction": 0.2})
    assert (s["dataset"]["kept"], s["dataset"]["dropped_by_reason"]) == (4, {"k_mismatch": 1})
    assert "heldout_label_accuracy" in s
