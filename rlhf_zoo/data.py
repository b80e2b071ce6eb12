"""User datasets: reading files and validating rows before anything is tokenised.

Formats read: ``.jsonl``, ``.json`` (a list of objects), ``.parquet``, or a directory saved by
``datasets.Dataset.save_to_disk``. Row schemas:

  sft       {"prompt": str, "completion": str}
  ranking   {"prompt": str, "chosen": str, "rejected": str, "margin"?: float}
            or {"prompt": str, "responses": [str, ...] (best first), "margins"?: [float] * C(K,2)}

A bad row raises `DataError` naming the row (1-based, as in the file) and the key; nothing is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

from rlhf_zoo.errors import DataError


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {str(path)!r} does not exist")
    if path.is_dir():
        import datasets

        return list(datasets.load_from_disk(str(path)))
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} row {n}: invalid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path.name}: expected a JSON list of objects, got {type(data).__name__}")
        return data
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    raise DataError(f"dataset {path.name}: unknown format {path.suffix!r}; use .jsonl, .json, .parquet or a saved dataset directory")


def _text(row: Any, n: int, key: str, allow_empty: bool = False) -> str:
    if not isinstance(row, dict):
        raise DataError(f"row {n}: expected an object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"row {n}: key {key!r} is missing")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"row {n}: key {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"row {n}: key {key!r} is empty")
    return value


def sft_examples(records: list[Any]) -> list[tuple[str, str]]:
    if not records:
        raise DataError("dataset has no rows")
    return [(_text(r, n, "prompt"), _text(r, n, "completion")) for n, r in enumerate(records, start=1)]


@dataclass(frozen=True)
class Ranking:
    prompt: str
    responses: list[str]  # best first
    margins: list[float]  # C(K,2), pair order (0,1), (0,2), ...


def ranking_examples(records: list[Any]) -> list[Ranking]:
    if not records:
        raise DataError("dataset has no rows")
    out = []
    for n, r in enumerate(records, start=1):
        prompt = _text(r, n, "prompt")
        if "responses" in r:
            responses = r["responses"]
            if not isinstance(responses, list) or len(responses) < 2:
                raise DataError(f"row {n}: key 'responses' must be a list of at least 2 strings")
            for i, resp in enumerate(responses):
                if not isinstance(resp, str) or not resp.strip():
                    raise DataError(f"row {n}: key 'responses' item {i} must be a non-empty string")
            if len(set(responses)) != len(responses):
                raise DataError(f"row {n}: key 'responses' holds the same response twice")
            margins = r.get("margins", [0.0] * comb(len(responses), 2))
            if not isinstance(margins, list) or len(margins) != comb(len(responses), 2):
                raise DataError(f"row {n}: key 'margins' must be a list of C(K,2) = {comb(len(responses), 2)} numbers")
        else:
            chosen, rejected = _text(r, n, "chosen"), _text(r, n, "rejected")
            if chosen == rejected:
                raise DataError(f"row {n}: keys 'chosen' and 'rejected' are identical")
            responses, margins = [chosen, rejected], [r.get("margin", 0.0)]
        if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in margins):
            raise DataError(f"row {n}: margins must be numbers")
        out.append(Ranking(prompt, list(responses), [float(m) for m in margins]))
    return out
