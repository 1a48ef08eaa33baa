"""Tokenizers: any local HF tokenizer, or the built-in word-level one for the synthetic data.

Every tokenizer gets the image placeholder `<image>` as a special token (so the text marker in
a prompt becomes exactly one id, later expanded to the projector's token count) and a chat
template. The synthetic tokenizer is built deterministically from the synthetic dataset's
vocabulary, so the demo and the tests need no download and never meet an unknown word.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pargo_dist.data.schema import IMAGE_MARKER

USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", USER, ASSISTANT, IMAGE_MARKER]

# A plain template for tokenizers that have none: every assistant turn ends with EOS, so a
# trained model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% else %}" + ASSISTANT + "{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (plus SPECIALS first, so <pad> is id 0).

    Newlines count as spaces; spaces are kept as a "▁" prefix (Metaspace) and punctuation is
    split off, so decoding restores in-vocabulary text (up to newlines). Each word is in the
    vocabulary both with and without the prefix (after a space, or right after a special token).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS + ["▁"])}
    for word in words:
        for piece, _ in pre.pre_tokenize_str(word):
            vocab.setdefault(piece, len(vocab))
            vocab.setdefault(piece.lstrip("▁") or piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Replace("\n", " ")
    core.pre_tokenizer = pre
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=[USER, ASSISTANT, IMAGE_MARKER],
    )
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def synthetic_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer of the built-in synthetic dataset (deterministic, ~100 ids)."""
    from pargo_dist.data.synthetic import synthetic_vocabulary

    return build_word_tokenizer(synthetic_vocabulary())


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerBase:
    """"synthetic" or a local tokenizer directory; ensures the <image> token and a chat template."""
    if str(spec) == "synthetic":
        return synthetic_tokenizer()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (or use 'synthetic')")
    tok = AutoTokenizer.from_pretrained(str(path))
    if IMAGE_MARKER not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
