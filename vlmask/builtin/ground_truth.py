"""The knockout ground truth of the built-in checkpoint, measured with plain PyTorch (no vlmask engine).

Blocking a key means no later query reads it, at every decoder layer: what vlmask's
``BlockKeys`` does, done here independently with forward pre-hooks that swap in a 4D mask.
:func:`knockout_report` checks that the asked-about cell's vision token matters most;
:func:`content_report` checks that the question's content word is read (blocking it costs
at least :data:`CONTENT_MARGIN` of KL). ``python -m vlmask.builtin.shapes knockout|content``
runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from vlmask.builtin.world import (
    FUNCTION_WORDS,
    KNOCKOUT_SEED,
    NUM_VISION_TOKENS,
    QUESTION_START,
    VISION_START,
    Scene,
    encode,
    sample_scene,
)


def block_keys_mask(seq_len: int, blocked: Iterable[int], dtype):
    """Additive ``(seq, seq)`` mask: causal, and no query after ``p`` reads key ``p`` for ``p`` in ``blocked``.

    Example:
        >>> import torch
        >>> (block_keys_mask(3, [1], torch.float32) == 0).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    import torch

    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    for p in blocked:
        allowed[p + 1 :, p] = False
    return torch.zeros(seq_len, seq_len, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def repeat_inputs(inputs, k: int) -> dict[str, Any]:
    """A one-prompt batch of processor ``inputs`` repeated ``k`` times (images included)."""
    import torch

    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("repeat_inputs takes a batch of one prompt")
    out = {}
    for key, value in inputs.items():
        if key == "pixel_values":  # flattened patches of the one image
            out[key] = value.repeat(k, 1)
        elif torch.is_tensor(value):
            out[key] = value.repeat(k, *([1] * (value.ndim - 1)))
        else:
            out[key] = value
    return out


@contextmanager
def keys_blocked(model, mask):
    """Run ``model`` with the additive ``(batch, 1, seq, seq)`` ``mask`` at every decoder layer's attention.

    Plain PyTorch: forward pre-hooks on each decoder ``self_attn`` swap in ``mask`` (the
    vision encoder is untouched). Works with eager and sdpa attention, with or without grad.

    Example:
        >>> import torch
        >>> from vlmask.builtin.world import encode, example_scene, load
        >>> model, processor = load()
        >>> inputs = encode(processor, [example_scene()])  # "what color is the circle ?" -> red
        >>> with keys_blocked(model, batch_block_mask(29, [[4]], model.dtype)), torch.no_grad():
        ...     answer = model(**inputs).logits[0, -1].argmax()  # the circle's cell (position 4) blocked
        >>> processor.tokenizer.convert_ids_to_tokens([int(answer)])
        ['green']
    """

    def hook(_module, args, kwargs):
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batch_block_mask(seq_len: int, blocked: Sequence[Sequence[int]], dtype):
    """``(len(blocked), 1, seq, seq)`` masks from :func:`block_keys_mask`, one per prompt of a batch.

    Example:
        >>> import torch
        >>> batch_block_mask(3, [[], [1]], torch.float32).shape
        torch.Size([2, 1, 3, 3])
    """
    import torch

    return torch.stack([block_keys_mask(seq_len, b, dtype) for b in blocked])[:, None]


def knockout_logprobs(model, inputs, blocked: Sequence[Sequence[int]]):
    """Last-position log-probabilities of one prompt, once per set of key positions in ``blocked``.

    Row ``i`` is the run in which no query reads a key in ``blocked[i]`` from a later
    position, at every decoder layer (``[]`` is the clean run). Plain PyTorch (see
    :func:`keys_blocked`). Returns a float tensor ``(len(blocked), vocab)``.
    """
    import torch

    batch = repeat_inputs(inputs, len(blocked))
    mask = batch_block_mask(inputs["input_ids"].shape[1], blocked, model.dtype)
    with torch.no_grad(), keys_blocked(model, mask):
        return model(**batch).logits[:, -1].float().log_softmax(-1)


def content_position(scene: Scene) -> int:
    """Sequence position of ``scene``'s content word (the shape or colour named in the question).

    Example:
        >>> from vlmask.builtin.world import example_scene
        >>> content_position(example_scene())  # "circle", the fifth word of "what color is the circle ?"
        24
    """
    return QUESTION_START + scene.question.split().index(scene.content[0])


def content_word_kls(model, processor, scenes: Sequence[Scene], batch_size: int = 100):
    """KL (nats) of the answer distribution from clean when each scene's content word is blocked.

    The content word's key is blocked from every later query at every decoder layer (what
    vlmask's ``BlockKeys`` of that position does); KL is ``sum p_clean (log p_clean - log p_blocked)``
    at the last prompt position. Returns a float numpy array, one value per scene.

    Example:
        >>> from vlmask.builtin.world import example_scene, load
        >>> model, processor = load()
        >>> float(content_word_kls(model, processor, [example_scene()])[0]) >= CONTENT_MARGIN
        True
    """
    import torch

    out = []
    for i in range(0, len(scenes), batch_size):
        batch = list(scenes[i : i + batch_size])
        inputs = encode(processor, batch)
        seq_len = inputs["input_ids"].shape[1]
        mask = batch_block_mask(seq_len, [[content_position(s)] for s in batch], model.dtype)
        with torch.no_grad():
            clean = model(**inputs).logits[:, -1].float().log_softmax(-1)
            with keys_blocked(model, mask):
                blocked = model(**inputs).logits[:, -1].float().log_softmax(-1)
        out.append((clean.exp() * (clean - blocked)).sum(-1).clamp_min(0.0))
    return torch.cat(out).numpy()


CONTENT_MARGIN = 1e-3
"""KL (nats) that blocking a question's content word must cost for the model to count as reading it."""


def content_report(model, processor, n: int = 200, seed: int = KNOCKOUT_SEED) -> dict[str, float]:
    """How much blocking the content word changes the answer, on ``n`` colour/shape scenes (half each).

    For each kind of question (and overall): the fraction of scenes where the KL reaches
    :data:`CONTENT_MARGIN` (``"color_read"``, ``"shape_read"``, ``"read"``) and the smallest and
    median KL (``"color_min_kl"``, ``"color_median_kl"``, ...).

    Example:
        >>> from vlmask.builtin.world import load
        >>> model, processor = load()
        >>> content_report(model, processor, n=4)["read"]
        1.0
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, ("color", "shape")[i % 2]) for i in range(n)]
    kls = content_word_kls(model, processor, scenes)
    kinds = np.array([s.kind for s in scenes])
    report: dict[str, float] = {"n": n}
    for name, chosen in (("color_", kinds == "color"), ("shape_", kinds == "shape"), ("", kinds != "")):
        values = kls[chosen]
        report[name + "read"] = float((values >= CONTENT_MARGIN).mean())
        report[name + "min_kl"] = float(values.min())
        report[name + "median_kl"] = float(np.median(values))
    return report


def knockout_report(model, processor, n: int = 100, seed: int = KNOCKOUT_SEED) -> dict[str, float]:
    """Check the ground truth the engine's tests rely on, on ``n`` colour/shape scenes (half each).

    * ``target_token_top``: fraction of scenes where blocking the asked-about shape's vision
      token drops the answer's log-probability more than blocking any other vision token.
    * ``content_word_read``: fraction where blocking the question's content word costs at
      least :data:`CONTENT_MARGIN` of KL (from the clean answer distribution).
    * ``content_word_top_kl`` / ``content_word_top_drop``: fraction where blocking the
      content word changes the answer distribution more (KL) / drops the answer's
      log-probability more than blocking any one of "what", "is", "the", by at least
      :data:`CONTENT_MARGIN` (so float32 noise does not count as a win).
    * ``clean_accuracy``: how many of these scenes the clean model answers right.
    """
    import torch

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, ("color", "shape")[i % 2]) for i in range(n)]
    target_wins = kl_wins = drop_wins = read = right = 0
    for scene in tqdm_iter(scenes, "knockout"):
        inputs = encode(processor, [scene])
        tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        words = scene.question.split()
        q_positions = {w: QUESTION_START + i for i, w in enumerate(words)}
        if tokens[QUESTION_START : QUESTION_START + len(words)] != words:
            raise ValueError(f"unexpected prompt layout: {tokens}")
        probe_words = [scene.content[0], *FUNCTION_WORDS]
        blocked = (
            [[]] + [[VISION_START + k] for k in range(NUM_VISION_TOKENS)] + [[q_positions[w]] for w in probe_words]
        )
        lp = knockout_logprobs(model, inputs, blocked)
        ans = processor.tokenizer.convert_tokens_to_ids(scene.answer)
        clean, vision, word_runs = lp[0], lp[1 : 1 + NUM_VISION_TOKENS], lp[1 + NUM_VISION_TOKENS :]
        right += int(int(clean.argmax()) == ans)
        drops = clean[ans] - vision[:, ans]
        target_wins += int(int(drops.argmax()) == scene.target_token)
        kl = torch.sum(clean.exp() * (clean - word_runs), dim=-1)
        word_drop = clean[ans] - word_runs[:, ans]
        read += int(float(kl[0]) >= CONTENT_MARGIN)
        kl_wins += int(bool((kl[0] >= kl[1:] + CONTENT_MARGIN).all()))
        drop_wins += int(bool((word_drop[0] >= word_drop[1:] + CONTENT_MARGIN).all()))
    return {
        "n": n,
        "clean_accuracy": right / n,
        "target_token_top": target_wins / n,
        "content_word_read": read / n,
        "content_word_top_kl": kl_wins / n,
        "content_word_top_drop": drop_wins / n,
    }


def tqdm_iter(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, mininterval=5)
