"""Caption controls: trigger word, prefix/suffix, tag shuffling, caption dropout.

Fixed controls (`trigger_word`, `caption_prefix`, `caption_suffix`) rewrite each caption once,
before training: the text-embedding cache stays on. Varying controls (`shuffle_tags`,
`caption_dropout_rate`) draw each time a caption is read, with Python's `random` (seeded by
`seed`, saved in checkpoints with the rest of the random state, so a resumed run draws the same);
a caption then differs from step to step, so its text embedding cannot be cached and the loop
turns text caching off, saying why in its start event.

The trigger word replaces `{trigger}` where a caption has it, else leads the caption
("trigger, caption"). Prefix and suffix are added as given (include your own separator). With
varying controls the raw caption is shuffled / dropped first and the fixed controls are applied
after, so the trigger word and prefix always lead, whatever the shuffle; a dropped caption is
empty (the unconditional case), trigger included.
"""

from __future__ import annotations

import dataclasses
import random

_active: CaptionPolicy | None = None  # the running training's varying controls (see activate)


@dataclasses.dataclass(frozen=True)
class CaptionPolicy:
    trigger_word: str | None = None
    prefix: str = ""
    suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0

    @classmethod
    def from_config(cls, config) -> CaptionPolicy:
        return cls(trigger_word=config.trigger_word, prefix=config.caption_prefix, suffix=config.caption_suffix,
                   shuffle_tags=config.shuffle_tags, keep_tokens=config.keep_tokens,
                   dropout_rate=config.caption_dropout_rate)

    @property
    def varies(self) -> bool:
        """Whether a caption can differ from one read to the next."""
        return self.shuffle_tags or self.dropout_rate > 0

    @property
    def why_varies(self) -> str | None:
        reasons = [name for name, on in (("shuffle_tags", self.shuffle_tags),
                                         ("caption_dropout_rate", self.dropout_rate > 0)) if on]
        return " and ".join(reasons) + " change captions every step" if reasons else None

    def fixed(self, caption: str) -> str:
        """The fixed controls: trigger word, prefix, suffix."""
        if self.trigger_word:
            caption = (caption.replace("{trigger}", self.trigger_word) if "{trigger}" in caption
                       else f"{self.trigger_word}, {caption}" if caption else self.trigger_word)
        return f"{self.prefix}{caption}{self.suffix}"

    def draw(self, caption: str) -> str:
        """The varying controls then the fixed ones, drawing with Python's `random`."""
        if self.dropout_rate > 0 and random.random() < self.dropout_rate:
            return ""
        if self.shuffle_tags:
            caption = shuffle_tags(caption, self.keep_tokens)
        return self.fixed(caption)


def shuffle_tags(caption: str, keep_tokens: int) -> str:
    """Shuffle the comma-separated tags after the first `keep_tokens` (kohya's shuffle_caption)."""
    tags = [tag.strip() for tag in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    random.shuffle(tail)
    return ", ".join(tag for tag in head + tail if tag)


def apply_fixed(policy: CaptionPolicy, examples: list) -> list:
    """The examples with the fixed controls applied (when no control varies: read as they are)."""
    if policy.varies or policy == CaptionPolicy():
        return examples

    def one(caption):
        return policy.fixed(caption) if isinstance(caption, str) else tuple(policy.fixed(c) for c in caption)

    return [dataclasses.replace(example, caption=one(example.caption)) for example in examples]


def activate(policy: CaptionPolicy | None) -> None:
    """The policy `draw_caption` (trainer/data.py) applies at every read; one training runs per
    process at a time (as for trainer/control.py), and setup sets it for each run."""
    global _active
    _active = policy if policy is not None and policy.varies else None


def transform(caption: str) -> str:
    return caption if _active is None else _active.draw(caption)
