"""Turn a sample's text into input_ids and labels: chat template, image placeholder, masking.

Captions (stage 1) become a two-turn chat: the user turn holds the image marker and a prompt,
the assistant turn holds the caption. Conversations (stage 2) are used as they are. Labels
are the assistant turns' tokens only (-100 everywhere else), found with the chat template
itself: the tokens of messages[:i] + generation prompt are a prefix of messages[:i+1], and
what lies between is turn i's answer. That works for any template that renders turns in
order, and the prefix property is checked, not assumed.

The single `<image>` token is then expanded to the projector's token count for that image's
crops (`visual_tokens`: fixed for ParGo's queries, one per patch of every crop for an MLP). Truncation cuts
the tail, never into the image span; a sample that cannot fit its image plus at least one
answer token is rejected (BadSample "too_long") instead of training on a broken sequence.
"""

from __future__ import annotations

import functools
from typing import Mapping

from pargo_dist.constants import IGNORE_INDEX
from pargo_dist.data.schema import CAPTION_PROMPT, IMAGE_MARKER, BadSample, place_image_marker
from pargo_dist.errors import UserError
from pargo_dist.models.mllm import insert_image_tokens


class PromptBuilder:
    def __init__(self, tokenizer, num_image_tokens: int | Mapping[int, int], max_len: int,
                 caption_prompt: str = CAPTION_PROMPT):
        """`num_image_tokens`: visual tokens of one image, or {crops: tokens} for every crop count
        the images can have (data.image.crops; a plain table, so the dataset pickles to workers)."""
        self.tokenizer = tokenizer
        self.tokens_per_crops = dict(num_image_tokens) if isinstance(num_image_tokens, Mapping) else {1: num_image_tokens}
        self.max_len = max_len
        self.caption_prompt = caption_prompt
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
        if self.image_id is None or self.image_id == tokenizer.unk_token_id:
            raise UserError(f"the tokenizer has no {IMAGE_MARKER} token: load it with pargo_dist.data.tokenizer")

    def messages(self, caption: str, messages: list[dict], has_image: bool) -> list[dict]:
        """The conversation to train on, with exactly one image marker iff there is an image."""
        if caption:
            messages = [
                {"role": "user", "content": f"{IMAGE_MARKER}\n{self.caption_prompt}"},
                {"role": "assistant", "content": caption},
            ]
        return place_image_marker(messages, has_image)

    def visual_tokens(self, crops: int = 1) -> int:
        """Image placeholders for an image of `crops` crops."""
        try:
            return self.tokens_per_crops[crops]
        except KeyError:
            raise ValueError(f"an image of {crops} crops: the prompt knows visual token counts for "
                             f"{sorted(self.tokens_per_crops)} crops only") from None

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        return list(self._render_turns(tuple((m["role"], m["content"]) for m in messages), generation_prompt))

    @functools.lru_cache(maxsize=256)
    def _render_turns(self, turns: tuple[tuple[str, str], ...], generation_prompt: bool) -> tuple[int, ...]:
        """The template, memoised: a caption sample asks for three renders, but the whole chat is
        also its last prefix, and the user turn is the same for every caption, so only one of
        the three is new work."""
        messages = [{"role": role, "content": content} for role, content in turns]
        return tuple(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt))

    def generation_prompt(self, text: str, crops: int = 1) -> list[int]:
        """The ids that ask the model about an image of `crops` crops: one user turn (image +
        `text`), the assistant's turn opened, the image placeholder expanded. What generation
        starts from."""
        ids = self._render(self.messages("", [{"role": "user", "content": text}], has_image=True), True)
        return insert_image_tokens(ids, self.image_id, self.visual_tokens(crops))

    def __call__(self, caption: str, messages: list[dict], crops: int) -> tuple[list[int], list[int]]:
        """-> (input_ids, labels), image placeholder expanded for an image of `crops` crops (0 or
        False: no image; True: one crop), at most max_len long."""
        n_visual = self.visual_tokens(int(crops)) if crops else 0
        messages = self.messages(caption, messages, bool(crops))
        ids = self._render(messages, False)
        labels = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._render(messages[:i], True)
            upto = self._render(messages[: i + 1], False)
            if ids[: len(prefix)] != prefix or ids[: len(upto)] != upto:
                raise UserError("the chat template does not render turns as prefixes of each other; "
                                 "labels cannot be located (use a standard template)")
            labels[len(prefix): len(upto)] = ids[len(prefix): len(upto)]

        out_ids, out_labels, image_end = [], [], 0
        for tok, lab in zip(ids, labels):
            if tok == self.image_id:
                out_ids += [tok] * n_visual
                out_labels += [IGNORE_INDEX] * n_visual
                image_end = len(out_ids)
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        if len(out_ids) > self.max_len:
            if image_end > self.max_len:
                raise BadSample("too_long", f"image tokens end at {image_end} > max_len {self.max_len}")
            out_ids, out_labels = out_ids[: self.max_len], out_labels[: self.max_len]
        if all(lab == IGNORE_INDEX for lab in out_labels):
            raise BadSample("too_long", f"no answer token left within max_len {self.max_len}")
        return out_ids, out_labels


def split_prompt_answer(input_ids, labels) -> tuple[list[int], list[int]]:
    """An encoded example (or a right-padded row) -> (prompt, answer): the prompt is everything
    before the first answer token, what generation starts from; the answer is every labelled
    token, what a generated caption is compared with."""
    ids, labels = [int(t) for t in input_ids], [int(t) for t in labels]
    answer = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    start = answer[0] if answer else len(ids)
    return ids[:start], [ids[i] for i in answer]
