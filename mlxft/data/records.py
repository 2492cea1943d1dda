"""Reading data files into (where, record) pairs and deciding each record's format.

Every failure is a `UserError` naming `file:line` (jsonl) or `file[index]` (json array), so a
user with a 100k-line file can jump straight to the bad record.  Nothing here knows about
tokenizers; rendering lives in `render.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlxft.errors import UserError

EXTENSIONS = (".jsonl", ".json")
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
FORMATS_HELP = (
    '{"text"}, {"prompt", "completion"}, {"messages": [{"role", "content"}, ...]}, '
    '{"conversations": [{"from", "value"}, ...]} (ShareGPT), '
    '{"instruction", "input", "output"} (alpaca), or any keys with '
    "prompt_template/completion_template"
)
# ShareGPT speakers -> chat roles (the `messages` path renders and masks them from here on)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


def _json_problem(err) -> str:
    """json's message plus the column ("Unterminated string starting at" already ends in "at")."""
    joiner = " " if err.msg.endswith(" at") else " at "
    return f"{err.msg}{joiner}column {err.colno}"


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_records(path: Path) -> list[tuple[str, dict]]:
    """All records of a .jsonl / .json file, as (where, record); blank jsonl lines are skipped."""
    if path.suffix not in EXTENSIONS:
        raise UserError(
            f"{path}: unsupported data file type '{path.suffix or '(none)'}'; "
            "use .jsonl (one JSON object per line), .json (a JSON array of objects), .parquet "
            "or .csv"
        )
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM, as some editors on Windows write
        raw = raw[3:]
    records = _read_json_array(path, raw) if path.suffix == ".json" else None
    if records is None:
        records = _read_jsonl(path, raw)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def _decode(path: Path, raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{where}: not UTF-8 text (byte {err.start}); re-save {path.name} as UTF-8"
        ) from None


def _check_unicode(value, text: str, where: str):
    """JSON may escape a lone UTF-16 surrogate (\\ud800) that no tokenizer can encode: refuse it
    here."""
    if _SURROGATE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(
                f"{where}: invalid text: a lone UTF-16 surrogate escape (like \\ud800) is not "
                "a character; fix or drop that escape"
            ) from None
    return value


def _loads(text: str, where: str):
    try:
        return _check_unicode(json.loads(text), text, where)
    except (
        json.JSONDecodeError
    ) as err:  # "line 1" would mislead in a jsonl line: give the column only
        raise UserError(f"{where}: invalid JSON ({_json_problem(err)})") from None
    except RecursionError:
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None


def _read_jsonl(path: Path, raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        text = _decode(path, line, where).strip()
        if not text:
            continue
        record = _loads(text, where)
        if not isinstance(record, dict):
            raise UserError(
                f'{where}: each line must be a JSON object like {{"text": ...}}, got '
                f"{_short(record)}"
            )
        out.append((where, record))
    return out


def _read_json_array(path: Path, raw: bytes):
    """A .json array; None when the file is really JSON lines (a common mislabel), to read it so."""
    text = _decode(path, raw, str(path))
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return None
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({_json_problem(err)})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON (nested too deeply)") from None
    _check_unicode(data, text, str(path))
    if isinstance(data, dict):  # one object: a one-line JSON-lines file
        return None
    if not isinstance(data, list):
        raise UserError(
            f"{path}: a .json data file must be an array of objects, got {type(data).__name__}; "
            "or use .jsonl with one object per line"
        )
    out = []
    for i, record in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(record, dict):
            raise UserError(
                f'{where}: each item must be a JSON object like {{"text": ...}}, got '
                f"{_short(record)}"
            )
        out.append((where, record))
    return out


def detect_format(record: dict, where: str, has_template: bool) -> str:
    """The record's format from its keys (a set prompt_template claims every record)."""
    if has_template:
        return "template"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    if {"chosen", "rejected"} <= set(record):  # TRL's preference pairs read as SFT data
        raise UserError(
            f"{where}: a preference pair ({keys}) where supervised records are read; for DPO "
            "or ORPO set train_mode: dpo or orpo (--train-mode dpo)"
        )
    raise UserError(
        f"{where}: record matches no data format (keys: {keys}); accepted: {FORMATS_HELP}"
    )


def _need_str(record: dict, key: str, where: str, optional: bool = False) -> None:
    value = record.get(key)
    if optional and value is None:
        return
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {_short(value)}")


def validate(record: dict, fmt: str, where: str) -> None:
    """Value types for `fmt`, checked before rendering so errors name the record, not jinja."""
    if fmt == "text":
        _need_str(record, "text", where)
    elif fmt == "completion":
        _need_str(record, "prompt", where)
        _need_str(record, "completion", where)
    elif fmt == "alpaca":
        _need_str(record, "instruction", where)
        _need_str(record, "input", where, optional=True)
        _need_str(record, "output", where)
    elif fmt == "chat":
        check_messages(record["messages"], "messages", where)
    elif fmt == "sharegpt":
        _validate_sharegpt(record, where)


def _check_turns(value, key: str, where: str, fields: tuple, shape: str, context: str = ""):
    """`value` (the record's `key`) is a non-empty list of dicts with string `fields`."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{key}' must be {shape}{context}, got {_short(value)}")
    for i, turn in enumerate(value):
        if not (isinstance(turn, dict) and all(isinstance(turn.get(f), str) for f in fields)):
            raise UserError(f"{where}: '{key}' must be {shape}; item {i} is {_short(turn)}")


def check_messages(value, key: str, where: str, context: str = "") -> None:
    """`value` (the record's `key`) is a non-empty list of {"role": str, "content": str}."""
    shape = 'a list of {"role": ..., "content": ...} objects'
    _check_turns(value, key, where, ("role", "content"), shape, context)


def _validate_sharegpt(record: dict, where: str) -> None:
    turns = record["conversations"]
    shape = 'a list of {"from": "human"|"gpt"|"system", "value": ...} objects'
    _check_turns(turns, "conversations", where, ("from", "value"), shape)
    for i, turn in enumerate(turns):
        if turn["from"] not in SHAREGPT_ROLES:
            raise UserError(
                f"{where}: ShareGPT role '{turn['from']}' (conversations item {i}) is not known; "
                f"use one of {', '.join(SHAREGPT_ROLES)}"
            )
    _need_str(record, "system", where, optional=True)
    if record.get("system") and turns[0]["from"] == "system":
        raise UserError(f"{where}: both a 'system' field and a system turn; keep one")


def sharegpt_messages(record: dict) -> list:
    """A validated ShareGPT record as chat messages (the optional `system` field first)."""
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [
        {"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]
    ]


def check_same_format(formats: list[str], records: list[tuple[str, dict]]) -> str:
    """One format per file: a mix is almost always a broken export, so stop at the first odd one."""
    first = formats[0]
    for fmt, (where, _) in zip(formats, records):
        if fmt != first:
            raise UserError(
                f"{where}: record is in '{fmt}' format but earlier records are '{first}'; "
                "use one format per file"
            )
    return first
