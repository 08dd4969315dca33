"""ShareGPT / UltraChat text dialogs (``format: sharegpt``).

Input: JSON lines (``.jsonl``; a ``.json`` list also works), one dialog per line, in any of:

- ShareGPT: ``{"id": "x1", "conversations": [{"from": "human", "value": "Hi"},
  {"from": "gpt", "value": "Hello!"}]}``
- UltraChat: ``{"id": "7", "data": ["question 1", "answer 1", "question 2", "answer 2"]}``
  (turns alternate, human first)
- messages (UltraChat-200k and most chat datasets): ``{"messages": [{"role": "user",
  "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}``

A malformed line is counted (``malformed_json``) and skipped. Text only: an ``image`` key, if any,
is ignored (use ``llava`` for image dialogs).
"""
from __future__ import annotations

from megatron_sphinx.data.conversation import ASSISTANT, HUMAN, Dialog
from megatron_sphinx.data.sources import Dropped, load_records


def load(spec):
    """Records of the file, in order."""
    return load_records(spec.path)


def convert(rec, spec, k: int) -> Dialog | Dropped:
    """One line to a dialog."""
    if not isinstance(rec, dict):
        return Dropped("malformed_record", "a line is not a JSON object")
    rid = str(rec.get("id", k))
    if isinstance(rec.get("conversations"), list):
        turns = [(t["from"], t["value"]) for t in rec["conversations"]]
    elif isinstance(rec.get("messages"), list):
        turns = [(t["role"], t["content"]) for t in rec["messages"]]
    elif isinstance(rec.get("data"), list):
        turns = [(HUMAN if i % 2 == 0 else ASSISTANT, t) for i, t in enumerate(rec["data"])]
    else:
        return Dropped("malformed_record", "no 'conversations', 'messages' or 'data'")
    return Dialog(turns, None, spec.name, rid)
