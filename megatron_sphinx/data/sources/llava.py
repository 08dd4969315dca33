"""LLaVA instruction data (``format: llava``).

Input: a JSON list (``.json``) or JSON lines (``.jsonl``) of records::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",          # optional: text-only without it
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]}

``image`` is relative to the source's ``image_root`` (default: the JSON file's folder). Roles
``human``/``user`` and ``gpt``/``assistant`` are accepted. Validation of the turns (``<image>``
placement, order) happens later, in :func:`megatron_sphinx.data.conversation.check_dialog`.
"""
from __future__ import annotations

from megatron_sphinx.data.conversation import Dialog
from megatron_sphinx.data.sources import Dropped, load_records


def load(spec):
    """Records of the file, in order."""
    return load_records(spec.path)


def convert(rec, spec, k: int) -> Dialog | Dropped:
    """One LLaVA record to a dialog."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return Dropped("malformed_record", "no 'conversations' list")
    turns = [(t["from"], t["value"]) for t in rec["conversations"]]
    image = spec.image_path(str(rec["image"])) if rec.get("image") else None
    return Dialog(turns, image, spec.name, str(rec.get("id", k)))
