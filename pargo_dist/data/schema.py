"""The one MDS sample layout every converter writes and the dataset reads.

A sample is either a caption (pretraining, stage 1) or a conversation (instruction tuning,
stage 2); both may carry one image, stored as its original encoded bytes (JPEG / PNG / ...),
not re-encoded unless the converter is asked to resize. Text-only samples have image b"".

    id        str    unique, stable key ("<source file>:<line or key>"), used in reports/tests
    image     bytes  encoded image, or b"" for text-only samples
    caption   str    the caption ("" for conversations)
    messages  json   [{"role": "user" | "assistant", "content": str}, ...] ([] for captions);
                     the image's place is marked by IMAGE_MARKER in a user turn
"""

from __future__ import annotations

from typing import Any

MDS_COLUMNS: dict[str, str] = {"id": "str", "image": "bytes", "caption": "str", "messages": "json"}
IMAGE_MARKER = "<image>"
# The user turn that turns a caption into a chat sample (prompt.py); the synthetic dataset's
# vocabulary covers it.
CAPTION_PROMPT = "Describe the image in detail."

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is a short, countable category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def normalize_messages(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """LLaVA `conversations` ({"from": "human"|"gpt", "value"}) or chat messages -> messages.

    Raises BadSample for an unknown role, an empty turn, or no assistant turn to learn from.
    """
    if not isinstance(turns, list) or not turns:
        raise BadSample("empty_conversation")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSample("malformed_conversation", f"turn {i} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLES:
            raise BadSample("malformed_conversation", f"turn {i} has unknown role {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise BadSample("empty_text", f"turn {i} is empty")
        out.append({"role": _ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadSample("no_answer", "no assistant/gpt turn")
    return out


def place_image_marker(messages: list[dict[str, str]], has_image: bool) -> list[dict[str, str]]:
    """Messages with exactly one IMAGE_MARKER if there is an image, none otherwise.

    An image without a marker gets one at the start of the first user turn. Several markers
    or a marker without an image raise BadSample. Used by the converter (reject early) and the
    prompt builder (the same rule at read time). Returns a new list; the input is not changed.
    """
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers > 1:
        raise BadSample("several_images", f"{markers} {IMAGE_MARKER} markers; one image per sample")
    if markers and not has_image:
        raise BadSample("marker_without_image", f"{IMAGE_MARKER} in the text but the sample has no image")
    messages = [dict(m) for m in messages]
    if has_image and not markers:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample("malformed_conversation", "an image but no user turn to place it in")
        first_user["content"] = f"{IMAGE_MARKER}\n" + first_user["content"]
    return messages


def make_sample(
    sample_id: str, image: bytes | None, caption: str | None = None, messages: list | None = None
) -> dict[str, Any]:
    """A validated MDS sample dict (see the module docstring). Exactly one of caption/messages."""
    if (caption is None) == (messages is None):
        raise BadSample("malformed", "a sample needs a caption or a conversation, not both/neither")
    if caption is not None and not caption.strip():
        raise BadSample("empty_text", "empty caption")
    return {
        "id": sample_id,
        "image": image or b"",
        "caption": caption.strip() if caption is not None else "",
        "messages": normalize_messages(messages) if messages is not None else [],
    }
