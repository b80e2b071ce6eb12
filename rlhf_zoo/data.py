"""User datasets: reading files and validating rows before anything is tokenised into tensors.

Files: ``.jsonl`` (one object per line; the row number is the line number), ``.json`` (a list of
objects), ``.parquet``, or a directory saved by ``datasets.Dataset.save_to_disk`` (row numbers count
from 1 in file order). Row formats (other keys are ignored):

  sft       {"prompt": str, "completion": str}
            {"messages": [{"role", "content"}, ...]}  conversational: the last message (the assistant's) is
                the completion, the messages before it the prompt
  ranking   {"prompt": str, "chosen": str, "rejected": str, "margin"?: number}
            {"prompt": str, "responses": [str, ...] (best first), "margins"?: [number] * C(K,2)}
            {"chosen": str, "rejected": str}  Anthropic HH text: two dialogues that share everything up
                to and including their last "\\n\\nAssistant:" (the prompt); the rest is the response
  prompts   {"prompt": str}  prompt-only rows for the online algorithms (``--prompts``)

Conversational rows (TRL's formats): a ``prompt`` may be a list of ``{"role", "content"}`` messages, a
``completion``, ``chosen``, ``rejected`` or ``responses`` entry a list holding the assistant's message;
``chosen``/``rejected`` message lists without a ``prompt`` key are implicit-prompt pairs (the messages they
share before their last one are the prompt). A conversational prompt becomes text through the world's
chat template with the generation prompt added (`rlhf_zoo.world.World.render_messages`); a response is
the assistant message's content.

The ranking format is detected per file: a file where no row has chosen, rejected or responses is
refused with the accepted formats; rows with a ``prompt`` (or ``responses``) key anywhere in the file
make it a prompt file (each row chosen/rejected or responses), otherwise it is HH text.

Validation, before the data become tensors:
  1. schema: types, empty strings, chosen == rejected (or a response listed twice), margins;
  2. tokens, with the task's tokenizer: a response word the tokenizer does not know (its id would be
     ``unk``, which the policy can never emit) is a bad row (``unknown_token``), and so is a prompt word
     it does not know (``unknown_prompt_token``: the model would read every such word as one token); a
     response over ``max_new_tokens`` tokens or a prompt over the model's positions minus BOS and
     ``max_new_tokens`` is a long row;
  3. reward-model data only (``same_k``): every ranking has as many responses as the first.

What happens to a bad or long row is the config's choice (`rlhf_zoo.config.DatasetConfig`):
``bad_rows`` raise | drop, ``long_rows`` raise | truncate | drop. Raising gives a `DataError` naming
the file, the 1-based row and the key (``data.jsonl row 3: key 'chosen' is missing``). Dropped rows are
counted by reason and truncated rows by key in a `DataReport` that goes to the run's summary.json; when
more than ``max_drop_fraction`` of the rows would be dropped, the run stops with the counts.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from math import comb
from pathlib import Path
from typing import Any, Protocol

from rlhf_zoo.errors import DataError

log = logging.getLogger(__name__)

HH_MARKER = "\n\nAssistant:"
HH_ROLES = ("Human:", "Assistant:")  # the role markers of Anthropic HH text
_HH = repr(HH_MARKER).replace("'", "")  # the marker as written in a message: \n\nAssistant:
RANKING_FORMATS = ("prompt/chosen/rejected[/margin], prompt/responses[/margins] (best first) or Anthropic HH "
                   "chosen/rejected text")
SFT_FORMATS = "prompt/completion or messages (conversational)"
PROMPT_FORMATS = "prompt (a string or a list of {role, content} messages)"
#: reasons a row is dropped, as counted in `DataReport.dropped`
REASONS = ("invalid_json", "not_an_object", "missing_key", "wrong_type", "empty", "identical", "wrong_length",
           "hh_format", "unknown_prompt_token", "unknown_token", "k_mismatch", "too_long")
LONG = "too_long"


class RowOptions(Protocol):
    """What to do with bad and long rows; `rlhf_zoo.config.DatasetConfig` is one."""

    bad_rows: str  # raise | drop
    long_rows: str  # raise | truncate | drop
    max_drop_fraction: float


@dataclass(frozen=True)
class RowPolicy:
    """A plain `RowOptions` (the defaults of `DatasetConfig`)."""

    bad_rows: str = "raise"
    long_rows: str = "truncate"
    max_drop_fraction: float = 0.1


@dataclass(frozen=True)
class LengthCaps:
    """Token caps of a text: a prompt (BOS not counted) and a response (EOS not counted); None: no cap."""

    prompt: int | None = None
    response: int | None = None


@dataclass(frozen=True)
class Ranking:
    prompt: str
    responses: list[str]  # best first
    margins: list[float]  # C(K,2), pair order (0,1), (0,2), ...


@dataclass
class DataReport:
    """What validation did to a dataset: rows read, dropped (by reason), truncated (by key)."""

    source: str  # the file's name, as messages give it
    format: str = ""
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    first_dropped: dict[str, str] = field(default_factory=dict)  # reason -> message of its first row
    truncated_rows: int = 0
    truncated: Counter = field(default_factory=Counter)  # key -> rows where it was cut
    caps: LengthCaps = LengthCaps()
    path: str = ""  # the path as given (summary.json); default: source

    @property
    def kept(self) -> int:
        return self.rows - sum(self.dropped.values())

    def metrics(self) -> dict[str, Any]:
        """``{"dataset": {...}}`` for summary.json."""
        return {"dataset": {
            "path": self.path or self.source, "format": self.format, "rows": self.rows, "kept": self.kept,
            "dropped": sum(self.dropped.values()), "dropped_by_reason": dict(sorted(self.dropped.items())),
            "first_dropped": dict(sorted(self.first_dropped.items())),
            "truncated": self.truncated_rows, "truncated_by_key": dict(sorted(self.truncated.items())),
            "prompt_token_cap": self.caps.prompt, "response_token_cap": self.caps.response}}

    def describe(self) -> str:
        """One line: what was dropped and truncated (empty when nothing was)."""
        parts = []
        if self.dropped:
            first = min(self.first_dropped.values(), key=_row_number)
            parts.append(f"dropped {sum(self.dropped.values())} of {_rows(self.rows)} ({_counts(self.dropped)}; "
                         f"first: {first})")
        if self.truncated_rows:
            parts.append(f"truncated {_rows(self.truncated_rows)} ({_counts(self.truncated)}; caps: prompt "
                         f"{self.caps.prompt}, response {self.caps.response} tokens)")
        return f"{self.source}: " + "; ".join(parts) if parts else ""


class _Bad(Exception):
    """A bad row inside validation: the reason it is counted under, and the message (no row number)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class _Unreadable:
    """A line of a .jsonl that is not JSON (it is a bad row like any other)."""

    message: str


# --- reading --------------------------------------------------------------------------------------------
def read_rows(path: str | Path, option: str = "") -> list[tuple[int, Any]]:
    """(row number as in the file, row) for every row; a .jsonl line that is not JSON becomes a bad row
    (reason ``invalid_json``), a file that cannot be read at all raises `DataError`. A path that does not
    exist and looks like ``org/name[@split]`` is read from the Hugging Face Hub (or its local cache);
    ``option`` (``--dataset``, ``--prompts``) is named in the errors about it."""
    given, path = str(path), Path(path)
    if not path.exists():
        hub_id, _, split = given.partition("@")
        if _hub_like(hub_id):
            return _numbered(_read_hub(hub_id, split or "train", option))
        raise DataError(f"{option or 'dataset'} {given!r} does not exist (not a file or directory, "
                        "nor a Hugging Face Hub dataset id such as org/name[@split])")
    suffix = path.suffix.lower()
    if path.is_dir():
        return _numbered(_read_saved(path))
    if suffix == ".jsonl":
        rows = []
        for n, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((n, _Unreadable(f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((n, _Unreadable(f"invalid JSON ({e.msg} at column {e.colno})")))
            except RecursionError:
                rows.append((n, _Unreadable("invalid JSON (nested too deeply)")))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(_read_bytes(path).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{_name(path)}: not UTF-8 text (byte at offset {e.start})") from None
        except json.JSONDecodeError as e:
            hint = "; one object per line is a .jsonl file" if e.msg == "Extra data" else ""
            raise DataError(f"{_name(path)}: invalid JSON at line {e.lineno} ({e.msg}){hint}") from None
        except RecursionError:
            raise DataError(f"{_name(path)}: invalid JSON (nested too deeply)") from None
        if not isinstance(data, list):
            raise DataError(f"{_name(path)}: expected a JSON list of objects, got {_type(data)}")
        return _numbered(data)
    if suffix == ".parquet":
        import datasets

        try:
            return _numbered(list(datasets.Dataset.from_parquet(str(path))))
        except Exception as e:  # pyarrow's errors are many; any of them means the file cannot be read
            raise DataError(f"{_name(path)}: cannot be read as parquet ({_first_line(e)})") from None
    raise DataError(f"dataset {_name(path)}: unknown format {path.suffix!r}; use .jsonl, .json, .parquet or a "
                    "directory saved by datasets' save_to_disk")


def read_records(path: str | Path) -> list[Any]:
    """The rows of a file, in order; a .jsonl line that is not JSON raises `DataError`."""
    rows = read_rows(path)
    for n, r in rows:
        if isinstance(r, _Unreadable):
            raise DataError(f"{_name(path)} row {n}: {r.message}")
    return [r for _, r in rows]


def _hub_like(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") and " " not in p for p in parts) \
        and not Path(source).suffix


def _read_hub(hub_id: str, split: str, option: str = "") -> list[Any]:
    """A Hub dataset's split (``org/name@split``, train by default), from the local cache when offline."""
    import datasets

    from rlhf_zoo.sources import offline

    try:
        if offline():  # datasets reads HF_HUB_OFFLINE at import only: say it again for this call
            datasets.config.HF_HUB_OFFLINE = True
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline, unknown id, unknown split: one line naming the option and the id
        why = "the machine is offline (HF_HUB_OFFLINE is set) and it is not in the local cache" if offline() \
            else "it could not be loaded"
        raise DataError(f"{option + ' ' if option else ''}dataset {hub_id!r} (split {split!r}): not a local path, and "
                        f"{why} ({_first_line(e)})") from None
    return list(ds)


def _name(path: str | Path) -> str:
    """How messages name a dataset: its file name (the path when it has none, like ``.``)."""
    return Path(path).name or str(path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"dataset {_name(path)}: cannot be read ({e.strerror or e})") from None


def _read_saved(path: Path) -> list[Any]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # not a saved dataset, or a damaged one
        raise DataError(f"dataset directory {_name(path)}: not a dataset saved by datasets' save_to_disk "
                        f"({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"dataset directory {_name(path)} holds the splits {', '.join(ds)}; pass one split's "
                        f"directory (e.g. {_name(path)}/{next(iter(ds), 'train')})")
    return list(ds)


def _numbered(records: Sequence[Any]) -> list[tuple[int, Any]]:
    return list(enumerate(records, start=1))


def numbered(records: Sequence[Any]) -> list[tuple[int, Any]]:
    """Rows numbered from 1, for the ``validate_*`` functions."""
    return _numbered(records)


# --- schema ---------------------------------------------------------------------------------------------
def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _object(row: Any, keys: str) -> dict[str, Any]:
    if isinstance(row, _Unreadable):
        raise _Bad("invalid_json", row.message)
    if not isinstance(row, dict):
        raise _Bad("not_an_object", f"expected an object with keys {keys}, got {_type(row)}")
    return row


def _text(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise _Bad("missing_key", f"key {key!r} is missing")
    value = row[key]
    if value is None:
        raise _Bad("missing_key", f"key {key!r} is null")
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"key {key!r} must be a string, got {_type(value)}")
    if not value.strip():
        raise _Bad("empty", f"key {key!r} is empty")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _Bad("wrong_type", f"{what} must be a finite number, got {value!r}"[:200])
    return float(value)


def _present(row: dict[str, Any], key: str) -> bool:
    return row.get(key) is not None  # parquet and saved datasets give null for a column a row lacks


@dataclass
class _Item:
    """A row that passed the schema: its number, its content, and the key each text came from."""

    number: int
    ranking: Ranking
    prompt_key: str
    response_keys: list[str]
    truncated: set[str] = field(default_factory=set)
    original: Any = None  # a prompt-only row: the prompt as given


Render = Any  # (messages, add_generation_prompt) -> str: a world's `render_messages`


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """A list of {role, content} messages, checked."""
    if not value:
        raise _Bad("empty", f"key {key!r} is an empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Bad("wrong_type", f"key {key!r}[{i}] must be a message {{'role': str, 'content': str}}, got "
                                     f"{str(m)[:80]}")
    return value


def _prompt_text(row: dict[str, Any], key: str, render: Render) -> str:
    """A prompt: a string, or messages through the chat template (generation prompt added)."""
    value = row.get(key)
    if isinstance(value, list):
        if render is None:
            raise _Bad("wrong_type", f"key {key!r} is a list of messages; conversational rows need a world with a "
                                     "chat template")
        return render(_messages(value, key), True)
    return _text(row, key)


def _assistant_text(value: Any, key: str) -> str:
    """A response given as a list of messages: the last one, which must be the assistant's."""
    last = _messages(value, key)[-1]
    if last["role"] != "assistant":
        raise _Bad("wrong_type", f"key {key!r}: the last message must be the assistant's, got role {last['role']!r}")
    if not last["content"].strip():
        raise _Bad("empty", f"key {key!r}: the assistant message is empty")
    return last["content"]


def _response_text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return _assistant_text(value, key) if isinstance(value, list) else _text(row, key)


def _implicit_row(n: int, row: Any, render: Render = None) -> _Item:
    """chosen/rejected message lists that share every message before their last (TRL's implicit prompt)."""
    row = _object(row, "chosen and rejected message lists")
    if not isinstance(row.get("chosen"), list) or not isinstance(row.get("rejected"), list):
        raise _Bad("wrong_type", "keys 'chosen' and 'rejected' must both be message lists (implicit-prompt format)")
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise _Bad("wrong_type", "keys 'chosen' and 'rejected' must share the messages before their last one (the "
                                 "prompt) and have at least one")
    if render is None:
        raise _Bad("wrong_type", "conversational rows need a world with a chat template")
    responses = [_assistant_text(chosen, "chosen"), _assistant_text(rejected, "rejected")]
    if responses[0] == responses[1]:
        raise _Bad("identical", "keys 'chosen' and 'rejected' are identical")
    margin = _number(row["margin"], "key 'margin'") if _present(row, "margin") else 0.0
    return _Item(n, Ranking(render(chosen[:-1], True), responses, [margin]), "chosen", ["chosen", "rejected"])


def _prompt_row(n: int, row: Any, render: Render = None) -> _Item:
    row = _object(row, "prompt and chosen/rejected or responses")
    prompt = _prompt_text(row, "prompt", render)
    if _present(row, "responses"):
        responses = row["responses"]
        if not isinstance(responses, list):
            raise _Bad("wrong_type", f"key 'responses' must be a list of strings, got {_type(responses)}")
        if len(responses) < 2:
            raise _Bad("wrong_length", f"key 'responses' must hold at least 2 responses, got {len(responses)}")
        responses = [_assistant_text(r, f"responses[{i}]") if isinstance(r, list) else r
                     for i, r in enumerate(responses)]
        for i, resp in enumerate(responses):
            if not isinstance(resp, str):
                raise _Bad("wrong_type", f"key 'responses'[{i}] must be a string, got {_type(resp)}")
            if not resp.strip():
                raise _Bad("empty", f"key 'responses'[{i}] is empty")
        seen: dict[str, int] = {}
        for i, resp in enumerate(responses):
            if resp in seen:
                raise _Bad("identical", f"keys 'responses'[{seen[resp]}] and 'responses'[{i}] are identical")
            seen[resp] = i
        pairs = comb(len(responses), 2)
        margins = [0.0] * pairs
        if _present(row, "margins"):
            if not isinstance(row["margins"], list):
                raise _Bad("wrong_type", f"key 'margins' must be a list of numbers, got {_type(row['margins'])}")
            if len(row["margins"]) != pairs:
                raise _Bad("wrong_length", f"key 'margins' must hold C(K,2) = {pairs} numbers for "
                                           f"{len(responses)} responses, got {len(row['margins'])}")
            margins = [_number(m, f"key 'margins'[{i}]") for i, m in enumerate(row["margins"])]
        keys = [f"responses[{i}]" for i in range(len(responses))]
        return _Item(n, Ranking(prompt, list(responses), margins), "prompt", keys)
    chosen, rejected = _response_text(row, "chosen"), _response_text(row, "rejected")
    if chosen == rejected:
        raise _Bad("identical", "keys 'chosen' and 'rejected' are identical")
    margin = _number(row["margin"], "key 'margin'") if _present(row, "margin") else 0.0
    return _Item(n, Ranking(prompt, [chosen, rejected], [margin]), "prompt", ["chosen", "rejected"])


def _hh_row(n: int, row: Any, render: Render = None) -> _Item:
    row = _object(row, "chosen and rejected (Anthropic HH text)")
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise _Bad("identical", "keys 'chosen' and 'rejected' are identical")
    cut = {}
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        i = text.rfind(HH_MARKER)
        if i < 0:
            raise _Bad("hh_format", f"key {key!r} has no '{_HH}' turn (a file without 'prompt' keys is read as "
                                    f"Anthropic HH text; accepted: {RANKING_FORMATS})")
        cut[key] = i + len(HH_MARKER)
    prompt = chosen[: cut["chosen"]]
    if rejected[: cut["rejected"]] != prompt:
        raise _Bad("hh_format", f"keys 'chosen' and 'rejected' do not share the dialogue up to their last '{_HH}'")
    responses = [chosen[len(prompt):], rejected[len(prompt):]]
    for key, resp in zip(("chosen", "rejected"), responses, strict=True):
        if not resp.strip():
            raise _Bad("empty", f"key {key!r} has an empty last Assistant turn")
    return _Item(n, Ranking(prompt, responses, [0.0]), "chosen", ["chosen", "rejected"])


def _sft_row(n: int, row: Any, render: Render = None) -> _Item:
    row = _object(row, "prompt and completion, or messages")
    if _present(row, "messages") and not _present(row, "completion"):
        messages = row["messages"]
        if not isinstance(messages, list):
            raise _Bad("wrong_type", f"key 'messages' must be a list of messages, got {_type(messages)}")
        messages = _messages(messages, "messages")
        if len(messages) < 2:
            raise _Bad("wrong_length", "key 'messages' needs a prompt message and the assistant's reply")
        if render is None:
            raise _Bad("wrong_type", "conversational rows need a world with a chat template")
        completion = _assistant_text(messages, "messages")
        return _Item(n, Ranking(render(messages[:-1], True), [completion], []), "messages", ["messages"])
    prompt, completion = _prompt_text(row, "prompt", render), _response_text(row, "completion")
    return _Item(n, Ranking(prompt, [completion], []), "prompt", ["completion"])


def _prompt_only_row(n: int, row: Any, render: Render = None) -> _Item:
    row = _object(row, "prompt")
    value = row.get("prompt")
    prompt = _prompt_text(row, "prompt", render)
    item = _Item(n, Ranking(prompt, [], []), "prompt", [])
    item.original = value  # the prompt as given (text or messages), for rewards
    return item


# --- tokens ---------------------------------------------------------------------------------------------
def length_caps(task: Any, max_new_tokens: int) -> LengthCaps:
    """The caps of a run: a response may take ``max_new_tokens`` tokens (a response of exactly that many
    loses only its EOS, like a sampled response that reaches the cap); a prompt may take the policy's
    context length (`rlhf_zoo.world.World.max_positions`) minus BOS and ``max_new_tokens`` (no prompt cap
    when the world does not know it)."""
    context = getattr(task, "max_positions", None)
    if not context:
        return LengthCaps(None, max_new_tokens)
    prompt = context - 1 - max_new_tokens
    return LengthCaps(prompt if prompt > 0 else None, max_new_tokens)


def _cut(tokenizer: Any, text: str, n: int, keep_end: bool) -> str:
    """``text`` cut to ``n`` tokens at a token boundary: its last ``n`` tokens or its first ``n``."""
    if n <= 0:
        return ""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # a slow tokenizer: decode the kept ids
        ids = tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.decode(ids[-n:] if keep_end else ids[:n])
    return text[offsets[-n][0]:] if keep_end else text[: offsets[n - 1][1]]


def _check_tokens(items: list[_Item], tokenizer: Any, caps: LengthCaps, long_rows: str) -> list[tuple[_Item, _Bad | None]]:
    """Unknown prompt or response words (bad rows) and over-long texts (long rows) of the schema-valid rows."""
    texts = [t for it in items for t in (it.ranking.prompt, *it.ranking.responses)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    unk = getattr(tokenizer, "unk_token_id", None)
    # a tokenizer whose unk is also a special token it writes itself (GPT-2: unk = eos) cannot tell
    # unknown prompt words from its chat template's markers
    special = {getattr(tokenizer, n, None) for n in ("eos_token_id", "bos_token_id", "pad_token_id")}
    prompt_unk = unk if unk not in special else None
    out: list[tuple[_Item, _Bad | None]] = []
    pos = 0
    for it in items:
        k = 1 + len(it.ranking.responses)
        p_ids, r_ids = ids[pos], ids[pos + 1 : pos + k]
        pos += k
        try:
            words = [] if prompt_unk is None or prompt_unk not in p_ids else [
                w for w in it.ranking.prompt.split()
                if w not in HH_ROLES and prompt_unk in tokenizer.encode(w, add_special_tokens=False)]
            if words:  # (an Anthropic HH prompt's role markers are the format's own, not the user's words)
                shown = ", ".join(repr(w) for w in words[:3])
                where = f"key {_key(it.prompt_key)}" if it.prompt_key == "prompt" else f"the prompt of key {_key(it.prompt_key)}"
                raise _Bad("unknown_prompt_token", f"{where} has words the tokenizer does not know ({shown}); "
                                                   "the model would read them all as one unknown token")
            for key, text, rids in zip(it.response_keys, it.ranking.responses, r_ids, strict=True):
                if unk is not None and unk in rids:
                    words = [w for w in text.split() if unk in tokenizer.encode(w, add_special_tokens=False)]
                    shown = ", ".join(repr(w) for w in words[:3]) or "some"
                    raise _Bad("unknown_token", f"key {_key(key)} has words the tokenizer does not know "
                                                f"({shown}); the policy can never generate them")
            long = []
            if caps.prompt is not None and len(p_ids) > caps.prompt:
                long.append(("prompt", it.prompt_key, len(p_ids), caps.prompt))
            if caps.response is not None:
                long += [(key, key, len(r), caps.response) for key, r in zip(it.response_keys, r_ids, strict=True)
                         if len(r) > caps.response]
            if long and long_rows != "truncate":
                what, key, n, cap = long[0]
                where = f"key {_key(key)}" if what != "prompt" or key == "prompt" else f"the prompt of key {_key(key)}"
                limit = ("response cap of {} (max_new_tokens)" if what != "prompt"
                         else "prompt cap of {} (the model's positions minus BOS and max_new_tokens)").format(cap)
                raise _Bad(LONG, f"{where} is {n} tokens, over the {limit}"
                                 + ("; set long_rows to truncate or drop to go on" if long_rows == "raise" else ""))
            if long:  # truncate: the prompt keeps its end (the context nearest the response), a response its start
                prompt, responses = it.ranking.prompt, list(it.ranking.responses)
                for what, key, _, cap in long:
                    if what == "prompt":
                        prompt = _cut(tokenizer, prompt, cap, keep_end=True)
                        it.truncated.add("prompt")
                    else:
                        i = it.response_keys.index(key)
                        responses[i] = _cut(tokenizer, responses[i], cap, keep_end=False)
                        it.truncated.add(key.split("[")[0])
                it.ranking = Ranking(prompt, responses, it.ranking.margins)
            out.append((it, None))
        except _Bad as bad:
            out.append((it, bad))
    return out


def _key(key: str) -> str:
    return f"'responses'[{key[10:-1]}]" if key.startswith("responses[") else repr(key)


# --- validation -----------------------------------------------------------------------------------------
def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _row_number(message: str) -> int:
    return int(message.split()[1].rstrip(":")) if message.startswith("row ") else 0


def _validate(
    rows: Sequence[tuple[int, Any]], parse: Any, options: RowOptions, source: str, tokenizer: Any,
    caps: LengthCaps | None, same_k: bool, fmt: str,
) -> tuple[list[_Item], DataReport]:
    caps = caps or LengthCaps()
    report = DataReport(source, fmt, len(rows), caps=caps)
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")

    def bad(n: int, b: _Bad, drop: bool) -> None:
        message = f"row {n}: {b.message}"
        if not drop:
            raise DataError(f"{source} {message}")
        report.dropped[b.reason] += 1
        report.first_dropped.setdefault(b.reason, message)

    # 1) schema
    items = []
    for n, row in rows:
        try:
            items.append(parse(n, row))
        except _Bad as b:
            bad(n, b, options.bad_rows == "drop")
    # 2) tokens: unknown prompt and response words (bad rows), lengths (long rows)
    if tokenizer is not None:
        checked, items = _check_tokens(items, tokenizer, caps, options.long_rows), []
        for it, b in checked:
            if b is None:
                items.append(it)
            else:
                bad(it.number, b, (options.long_rows if b.reason == LONG else options.bad_rows) == "drop")
    # 3) the same number of responses in every ranking (reward-model training batches whole rankings)
    if same_k and items:
        first, k_items = items[0], []
        k = len(first.ranking.responses)
        for it in items:
            if len(it.ranking.responses) == k:
                k_items.append(it)
                continue
            keys = "key 'responses'" if it.response_keys[0].startswith("responses") else "keys 'chosen', 'rejected'"
            bad(it.number, _Bad("k_mismatch", f"{len(it.ranking.responses)} responses ({keys}) but row {first.number} "
                                              f"has {k}; every ranking needs the same number of responses"),
                options.bad_rows == "drop")
        items = k_items
    for it in items:
        report.truncated.update(it.truncated)
        report.truncated_rows += bool(it.truncated)
    # 4) how much was dropped
    dropped = sum(report.dropped.values())
    if dropped > options.max_drop_fraction * len(rows) or not items:
        first = min(report.first_dropped.values(), key=_row_number)
        raise DataError(f"{source}: {dropped} of {_rows(len(rows))} dropped ({_counts(report.dropped)}), "
                        + (f"more than max_drop_fraction {options.max_drop_fraction} allows" if items else "none left")
                        + f"; first: {first}")
    if report.describe():
        log.warning(report.describe())
    return items, report


def _ranking_format(rows: Sequence[tuple[int, Any]], source: str) -> tuple[Any, str]:
    """The format family of a ranking file: prompt rows (chosen/rejected or responses) or HH text."""
    dicts = [r for _, r in rows if isinstance(r, dict)]
    if not any(_present(r, k) for r in dicts for k in ("chosen", "rejected", "responses")):
        raise DataError(f"{source}: no row has the keys of a ranking format{_first_keys(rows)}; accepted: "
                        f"{RANKING_FORMATS}")
    conversational = " (conversational)" if any(isinstance(v, list) and v and isinstance(v[0], dict)
                                                 for r in dicts for v in r.values()) else ""
    if any(_present(r, "prompt") or _present(r, "responses") for r in dicts):
        kinds = {"prompt/responses" if _present(r, "responses") else "prompt/chosen/rejected"
                 for r in dicts if _present(r, "prompt")}
        return _prompt_row, ("+".join(sorted(kinds)) or "prompt/chosen/rejected") + conversational
    if any(isinstance(r.get("chosen"), list) for r in dicts):
        return _implicit_row, "chosen/rejected (conversational, implicit prompt)"
    return _hh_row, "anthropic-hh"


def _first_keys(rows: Sequence[tuple[int, Any]]) -> str:
    """What the first row holds, for a "no row has the keys" error: its keys, or why it is no object."""
    for n, r in rows:
        if isinstance(r, dict):
            return f" (row {n} has keys {', '.join(repr(str(k)) for k in list(r)[:8]) or 'none'})"
    n, r = rows[0]
    return f" (row {n}: {r.message})" if isinstance(r, _Unreadable) else f" (row {n} is a {type(r).__name__}, not an object)"


def validate_rankings(
    rows: Sequence[tuple[int, Any]], options: RowOptions = RowPolicy(), *, source: str = "dataset",
    tokenizer: Any = None, caps: LengthCaps | None = None, same_k: bool = False, render: Render = None,
) -> tuple[list[Ranking], DataReport]:
    """Rankings from numbered rows (see `read_rows`, `numbered`) in any ranking format.

    Without a tokenizer there is no token check. ``same_k``: every ranking must have as many responses as
    the first kept one. Raises `DataError` (naming source, row and key) under the ``raise`` policies, or
    when more than ``options.max_drop_fraction`` of the rows are dropped."""
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")
    parse, fmt = _ranking_format(rows, source)
    items, report = _validate(rows, partial(parse, render=render), options, source, tokenizer, caps, same_k, fmt)
    return [it.ranking for it in items], report


def validate_sft(
    rows: Sequence[tuple[int, Any]], options: RowOptions = RowPolicy(), *, source: str = "dataset",
    tokenizer: Any = None, caps: LengthCaps | None = None, render: Render = None,
) -> tuple[list[tuple[str, str]], DataReport]:
    """(prompt, completion) pairs from numbered rows; like `validate_rankings`."""
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")
    if not any(isinstance(r, dict) and (_present(r, "completion") or _present(r, "messages")) for _, r in rows):
        raise DataError(f"{source}: no row has the keys of an SFT format{_first_keys(rows)}; accepted: {SFT_FORMATS}")
    fmt = "messages" if any(isinstance(r, dict) and _present(r, "messages") for _, r in rows) else "prompt/completion"
    items, report = _validate(rows, partial(_sft_row, render=render), options, source, tokenizer, caps, False, fmt)
    return [(it.ranking.prompt, it.ranking.responses[0]) for it in items], report


def validate_prompts(
    rows: Sequence[tuple[int, Any]], options: RowOptions = RowPolicy(), *, source: str = "prompts",
    tokenizer: Any = None, caps: LengthCaps | None = None, render: Render = None,
) -> tuple[list[tuple[str, Any]], DataReport]:
    """(prompt text, prompt as given) of prompt-only rows; like `validate_rankings`."""
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")
    if not any(isinstance(r, dict) and _present(r, "prompt") for _, r in rows):
        raise DataError(f"{source}: no row has the keys of a prompt file{_first_keys(rows)}; accepted: {PROMPT_FORMATS}")
    items, report = _validate(rows, partial(_prompt_only_row, render=render), options, source, tokenizer, caps,
                              False, "prompt")
    return [(it.ranking.prompt, it.original if "prompt" not in it.truncated else it.ranking.prompt)
            for it in items], report


def load_rankings(path: str | Path, options: RowOptions, task: Any, max_new_tokens: int,
                  same_k: bool = False) -> tuple[list[Ranking], DataReport]:
    """Read and validate a ranking file (a path or a Hub dataset id) with the world's tokenizer, chat
    template and the run's length caps."""
    out = validate_rankings(read_rows(path, "--dataset"), options, source=_name(path), tokenizer=task.tokenizer,
                            caps=length_caps(task, max_new_tokens), same_k=same_k, render=_render(task))
    out[1].path = str(path)
    return out


def load_sft(path: str | Path, options: RowOptions, task: Any,
             max_new_tokens: int) -> tuple[list[tuple[str, str]], DataReport]:
    """Read and validate a prompt/completion (or messages) file with the world's tokenizer and the run's
    length caps."""
    out = validate_sft(read_rows(path, "--dataset"), options, source=_name(path), tokenizer=task.tokenizer,
                       caps=length_caps(task, max_new_tokens), render=_render(task))
    out[1].path = str(path)
    return out


def load_prompts(path: str | Path, options: RowOptions, task: Any,
                 max_new_tokens: int) -> tuple[list[tuple[str, Any]], DataReport]:
    """Read and validate a prompt-only file: (prompt text, prompt as given) per kept row."""
    out = validate_prompts(read_rows(path, "--prompts"), options, source=_name(path), tokenizer=task.tokenizer,
                           caps=length_caps(task, max_new_tokens), render=_render(task))
    out[1].path = str(path)
    return out


def _render(task: Any) -> Render:
    return getattr(task, "render_messages", None)


# --- without a tokenizer, raising at the first bad row ---------------------------------------------------
def sft_examples(records: list[Any]) -> list[tuple[str, str]]:
    return validate_sft(numbered(records))[0]


def ranking_examples(records: list[Any]) -> list[Ranking]:
    return validate_rankings(numbered(records))[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
