"""What the master keeps of a job's results and progress: checked shapes, bounded sizes.

An accepted agent is still attacker-controlled (root on one Pi). What it reports about a job is
stored and shown to everyone (`pimaster job`, `jobs`, the live view), so it is checked here
first: the known fields of Salt's result shape with their types, strings and data bounded,
numbers finite, and the summary counted by the master from the results rather than believed.
A result that does not fit is replaced by a failed one saying so, never stored as sent.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

STATUSES = ("ok", "changed", "failed", "not_run", "skipped")
MAX_COMMENT = 64 * 1024
MAX_CHANGES_BYTES = 256 * 1024
MAX_FIELD = 4096
# Shown on the person's terminal: no control characters but line breaks and tabs (an escape
# sequence could rewrite what the terminal shows), no bidirectional overrides or marks, no Unicode
# line or paragraph separators.
CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
STATE_FUN_RE = re.compile(r"[a-z][a-z0-9_]{0,31}\.[a-z][a-z0-9_]{0,63}")
MAX_TIME = 1e11  # seconds since 1970: any real timestamp is far below


def _finite(value: Any, low: float = -math.inf, high: float = math.inf) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and low <= value <= high:
        return value
    return None


def _text(value: Any, limit: int) -> str | None:
    return CONTROL_RE.sub("?", value[:limit]) if isinstance(value, str) else None


def one_line(value: Any, limit: int = 200) -> str:
    """An agent's text for a one-line field (a name, a reason, an error): no control characters and
    no line breaks, so that it cannot forge lines of the output it is printed in."""
    return CONTROL_RE.sub("?", str(value)[:limit]).replace("\n", " ")


def _line(value: Any, limit: int) -> str | None:
    return one_line(value, limit) if isinstance(value, str) else None


def _clean(value: Any) -> Any:
    """``value`` with every string in it (keys too) free of control characters."""
    if isinstance(value, str):
        return CONTROL_RE.sub("?", value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def _changes(value: Any) -> Any:
    """A map of plain JSON data within MAX_CHANGES_BYTES (Salt's shape), or one saying why not."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        return {"refused": "the agent reported changes that are not a map"}
    try:
        # Measured as kept (control characters replaced, text as text): a command's binary output
        # must not count six times its size for the escapes it would have had.
        value = _clean(value)
        size = len(json.dumps(value, allow_nan=False, ensure_ascii=False))
    except (TypeError, ValueError, RecursionError):
        return {"refused": "the agent reported changes that are not plain data"}
    if size > MAX_CHANGES_BYTES:
        return {"refused": f"the agent reported {size} bytes of changes (at most {MAX_CHANGES_BYTES} are kept)"}
    return value


def check_state_result(raw: Any) -> dict:
    """One state's result in the shape every view reads."""
    if not isinstance(raw, dict):
        return {"id": "?", "fun": "?", "name": "?", "result": False, "changes": {}, "status": "failed",
                "comment": "the agent reported a malformed result"}
    result = raw.get("result")
    out = {
        "id": _line(raw.get("id"), MAX_FIELD) or "?",
        "fun": raw["fun"] if isinstance(raw.get("fun"), str) and STATE_FUN_RE.fullmatch(raw["fun"]) else "?",
        "name": _line(raw.get("name"), MAX_FIELD) or "?",
        "result": result if result in (True, False, None) else False,
        "changes": _changes(raw.get("changes")),
        "comment": _text(raw.get("comment"), MAX_COMMENT) or "",
    }
    status = raw.get("status")
    out["status"] = status if status in STATUSES else ("failed" if out["result"] is False else
                                                      "changed" if out["changes"] else "ok")
    if out["result"] is False:
        out["status"] = "failed" if out["status"] not in ("not_run", "skipped") else out["status"]
    source = _line(raw.get("source"), MAX_FIELD)
    if source is not None:
        out["source"] = source
    duration = _finite(raw.get("duration_ms"), 0, 1e10)
    if duration is not None:
        out["duration_ms"] = duration
    if raw.get("sensitive") is True:
        out["sensitive"] = True
    return out


def summarize(results: list[dict]) -> dict:
    counts = {status: 0 for status in STATUSES}
    for res in results:
        counts[res["status"]] += 1
    return counts


def check_job_result(body: dict, states: int) -> dict | None:
    """A job_result message's body checked against the job (``states``: how many states it sent
    this node), or None when it is not a job result at all."""
    results = body.get("results")
    if not isinstance(results, list) or len(results) > states:
        return None
    checked = [check_state_result(r) for r in results]
    return {"results": checked, "summary": summarize(checked),
            "status": "interrupted" if body.get("interrupted") is True else "done",
            "started": _finite(body.get("started"), 0, MAX_TIME), "finished": _finite(body.get("finished"), 0, MAX_TIME)}


def check_progress(body: dict) -> dict | None:
    """A job_progress message's body: {job, index, state}, or None."""
    index = body.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1_000_000:
        return None
    state = check_state_result(body.get("state"))
    return {"job": body.get("job"), "index": index,
            "state": {"id": state["id"], "fun": state["fun"], "status": state["status"],
                      "comment": state["comment"][:300]}}


BOOT_ID_RE = re.compile(r"[0-9A-Za-z._:-]+")
THROTTLED_RE_CHARS = set("0123456789abcdefx")


def check_health(body: dict) -> dict:
    """The health fields of a ping answer that have the right shape (see piagent.facts.health);
    anything else is left out, so one node cannot break `pimaster ping` for everyone."""
    out: dict = {}
    for name, low, high in (("uptime_s", 0, 1e10), ("temp_c", -100, 200), ("disk_root_used_pct", 0, 100),
                            ("memory_used_pct", 0, 100), ("time", 0, 1e11), ("booted_at", 0, 1e11)):
        value = _finite(body.get(name))
        if value is not None and low <= value <= high:
            out[name] = value
    free = body.get("disk_root_free_mb")
    if isinstance(free, int) and not isinstance(free, bool) and 0 <= free < 1 << 40:
        out["disk_root_free_mb"] = free
    available = body.get("memory_available_mb")
    if isinstance(available, int) and not isinstance(available, bool) and 0 <= available < 1 << 40:
        out["memory_available_mb"] = available
    # Which boot is running (`pimaster reboot` compares them): the kernel's boot id, a UUID, and
    # PID 1's start in ticks. Only plain tokens: they are printed and compared, never interpreted.
    boot_id = body.get("boot_id")
    if isinstance(boot_id, str) and 0 < len(boot_id) <= 64 and BOOT_ID_RE.fullmatch(boot_id):
        out["boot_id"] = boot_id
    boot_init = body.get("boot_init")
    if isinstance(boot_init, int) and not isinstance(boot_init, bool) and 0 <= boot_init < 1 << 63:
        out["boot_init"] = boot_init
    load = body.get("load")
    if isinstance(load, list) and len(load) == 3 and all(_finite(x) is not None and 0 <= x < 1e6 for x in load):
        out["load"] = load
    throttled = body.get("throttled")
    if isinstance(throttled, str) and 2 < len(throttled) <= 10 and throttled.startswith("0x") \
            and set(throttled) <= THROTTLED_RE_CHARS:
        out["throttled"] = throttled
        flags = body.get("throttled_flags")
        if isinstance(flags, list) and len(flags) <= 32 and all(isinstance(f, str) and f.replace("-", "").isalpha()
                                                               and len(f) <= 64 for f in flags):
            out["throttled_flags"] = flags
    return out
