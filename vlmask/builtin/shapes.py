"""Training the built-in checkpoint on the shapes world (:mod:`vlmask.builtin.world`), and its knockout ground truth.

Command line (deterministic, CPU)::

    python -m vlmask.builtin.shapes train [--out DIR] [--steps N]
    python -m vlmask.builtin.shapes evaluate [--model DIR] [--n 500] [--seed S]
    python -m vlmask.builtin.shapes knockout [--model DIR] [--n 100] [--seed S]
    python -m vlmask.builtin.shapes example [--out examples/shapes.png]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmask.builtin import DEFAULT_MODEL_PATH, tiny_config
from vlmask.builtin.world import (
    EVAL_SEED,
    FUNCTION_WORDS,
    GRID,
    KNOCKOUT_SEED,
    NUM_VISION_TOKENS,
    QUESTION_KINDS,
    QUESTION_START,
    TRAIN_SEED,
    VISION_START,
    Scene,
    accuracy,
    build_processor,
    encode,
    example_scene,
    load,
    predict,
    sample_scene,
    sample_scenes,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    single_steps: int = 150
    decay: float = 0.4
    aux_weight: float = 0.5
    weight_decay: float = 0.01
    seed: int = TRAIN_SEED
    hidden_size: int = 128
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vision_hidden: int = 64
    vision_depth: int = 2
    threads: int = 2
    log_every: int = 100


def _cell_loss(logits, scenes: Sequence[Scene], vocab: dict[str, int]):
    """Auxiliary loss: at the vision token of each shape, the colour and shape words.

    The output at a shape's vision token should put half its probability on the colour
    word and half on the shape word (cross-entropy against both; empty cells are not
    scored). This makes each cell's token carry what is in that cell, so the model
    answers by finding the asked-about shape's token rather than by some diffuse route.
    """
    import torch

    targets = torch.full((len(scenes), NUM_VISION_TOKENS, 2), -1, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for item in scene.items:
            targets[b, item.row * GRID + item.col] = torch.tensor([vocab[item.color], vocab[item.shape]])
    filled = targets[..., 0] >= 0
    logp = logits[:, VISION_START : VISION_START + NUM_VISION_TOKENS].float().log_softmax(-1)
    return -logp.gather(-1, targets.clamp(min=0)).sum(-1)[filled].mean()


def _optimizer(model: Any, config: TrainConfig) -> tuple[Any, Any]:
    """AdamW (no weight decay on embeddings and 1-D parameters) and its learning-rate schedule:
    warm up, hold, then a cosine decay over the last ``config.decay`` fraction of training."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        start = int(config.steps * (1 - config.decay))
        if step < start:
            return 1.0
        progress = (step - start) / max(1, config.steps - start)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def _train_step(
    model: Any, optimizer: Any, scheduler: Any, inputs: Any, scenes: list, vocab: dict, config: TrainConfig
):
    """One optimiser step on a batch; returns its loss and answer accuracy (floats)."""
    import torch

    logits = model(**inputs).logits
    # loss on the answer (predicted at the prompt's last token) and on <|im_end|> after it
    ids = inputs["input_ids"]
    loss = torch.nn.functional.cross_entropy(
        logits[:, -3:-1].reshape(-1, logits.shape[-1]).float(), ids[:, -2:].reshape(-1)
    )
    if config.aux_weight > 0:
        loss = loss + config.aux_weight * _cell_loss(logits, scenes, vocab)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item(), (logits[:, -3].argmax(-1) == ids[:, -2]).float().mean().item()


def train(config: TrainConfig, out: str | Path = DEFAULT_MODEL_PATH) -> dict[str, Any]:
    """Train a fresh model on freshly sampled scenes and save it (and the processor) to ``out``.

    Deterministic for a given config on a given machine. Returns a summary dict.
    """
    import torch
    from tqdm import tqdm
    from transformers import Qwen3VLForConditionalGeneration

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    processor = build_processor()
    model_config = tiny_config(
        len(processor.tokenizer),
        hidden_size=config.hidden_size,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        vision_hidden=config.vision_hidden,
        vision_depth=config.vision_depth,
    )
    model = Qwen3VLForConditionalGeneration(model_config)
    model.train()
    optimizer, scheduler = _optimizer(model, config)
    vocab = processor.tokenizer.get_vocab()
    start = time.time()
    running = running_acc = None
    bar = tqdm(range(config.steps), desc="train", mininterval=5)
    for step in bar:
        # curriculum: single shapes first (learn to read colour and shape off a vision
        # token), then 1-4 shapes (learn to find the asked-about one)
        counts = (1,) if step < config.single_steps else (1, 2, 3, 4)
        scenes = [sample_scene(rng, counts=counts) for _ in range(config.batch_size)]
        inputs = encode(processor, scenes, with_answer=True)
        loss, right = _train_step(model, optimizer, scheduler, inputs, scenes, vocab, config)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        running_acc = right if running_acc is None else 0.98 * running_acc + 0.02 * right
        bar.set_postfix(loss=f"{running:.4f}", acc=f"{running_acc:.3f}", refresh=False)
        if step % config.log_every == 0 or step == config.steps - 1:
            logger.info("step %d loss %.4f train acc %.3f (%.0f s)", step, running, running_acc, time.time() - start)
    seconds = time.time() - start
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    logger.info("saved to %s after %d steps in %.0f s", out, config.steps, seconds)
    return {"steps": config.steps, "seconds": seconds, "final_loss": running, "out": str(out)}


# ----------------------------------------------------------------------------- knockout ground truth


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


def knockout_logprobs(model, inputs, blocked: Sequence[Sequence[int]]):
    """Last-position log-probabilities of one prompt, once per set of key positions in ``blocked``.

    Row ``i`` is the run in which no query reads a key in ``blocked[i]`` from a later
    position, at every decoder layer (``[]`` is the clean run). Plain PyTorch: forward
    pre-hooks on each decoder ``self_attn`` swap in a 4D additive mask, so ``model`` must
    use eager attention. Returns a float tensor ``(len(blocked), vocab)``.
    """
    import torch

    seq_len = inputs["input_ids"].shape[1]
    batch = repeat_inputs(inputs, len(blocked))
    mask = torch.stack([block_keys_mask(seq_len, b, model.dtype) for b in blocked])[:, None]

    def hook(_module, args, kwargs):
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers
    ]
    try:
        with torch.no_grad():
            return model(**batch).logits[:, -1].float().log_softmax(-1)
    finally:
        for h in handles:
            h.remove()


def knockout_report(model, processor, n: int = 100, seed: int = KNOCKOUT_SEED) -> dict[str, float]:
    """Check the ground truth the engine's tests rely on, on ``n`` colour/shape scenes (half each).

    * ``target_token_top``: fraction of scenes where blocking the asked-about shape's vision
      token drops the answer's log-probability more than blocking any other vision token.
    * ``content_word_top_kl`` / ``content_word_top_drop``: fraction where blocking the
      question's content word changes the answer distribution more (KL from the clean
      distribution) / drops the answer's log-probability more than blocking any one of
      "what", "is", "the".
    * ``clean_accuracy``: how many of these scenes the clean model answers right.
    """
    import torch

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, ("color", "shape")[i % 2]) for i in range(n)]
    target_wins = kl_wins = drop_wins = right = 0
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
        kl_wins += int(bool((kl[0] > kl[1:]).all()))
        drop_wins += int(bool((word_drop[0] > word_drop[1:]).all()))
    return {
        "n": n,
        "clean_accuracy": right / n,
        "target_token_top": target_wins / n,
        "content_word_top_kl": kl_wins / n,
        "content_word_top_drop": drop_wins / n,
    }


def tqdm_iter(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, mininterval=5)


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmask.builtin.shapes {train,evaluate,knockout,example}``."""
    parser = argparse.ArgumentParser(prog="python -m vlmask.builtin.shapes", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the default checkpoint from scratch")
    p_train.add_argument("--out", default=str(DEFAULT_MODEL_PATH))
    defaults = TrainConfig()
    for name in TrainConfig.__dataclass_fields__:
        kind = type(getattr(defaults, name))
        p_train.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name))
    p_train.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    p_eval = sub.add_parser("evaluate", help="held-out accuracy on fresh scenes")
    p_eval.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p_eval.add_argument("--n", type=int, default=500)
    p_eval.add_argument("--seed", type=int, default=EVAL_SEED)
    p_ko = sub.add_parser("knockout", help="check the attention-knockout ground truth")
    p_ko.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p_ko.add_argument("--n", type=int, default=100)
    p_ko.add_argument("--seed", type=int, default=KNOCKOUT_SEED)
    p_ex = sub.add_parser("example", help="write the example image")
    p_ex.add_argument("--out", default="examples/shapes.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(getattr(args, "threads", 2))
    if args.command == "train":
        fields = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__}
        summary = train(TrainConfig(**fields), args.out)
        logger.info("training summary: %s", summary)
        if not args.no_eval:
            model, processor = load(args.out)
            acc = accuracy(model, processor, sample_scenes(500, EVAL_SEED))
            logger.info("held-out accuracy on 500 scenes (seed %d): %.4f", EVAL_SEED, acc)
    elif args.command == "evaluate":
        model, processor = load(args.model)
        scenes = sample_scenes(args.n, args.seed)
        preds = predict(model, processor, scenes)
        for kind in QUESTION_KINDS:
            pairs = [(p, s) for p, s in zip(preds, scenes, strict=False) if s.kind == kind]
            if pairs:
                logger.info("%s: %d/%d right", kind, sum(p == s.answer for p, s in pairs), len(pairs))
        acc = sum(p == s.answer for p, s in zip(preds, scenes, strict=False)) / len(scenes)
        logger.info("held-out accuracy on %d scenes (seed %d): %.4f", args.n, args.seed, acc)
    elif args.command == "knockout":
        model, processor = load(args.model, attn_implementation="eager")
        logger.info("knockout ground truth: %s", knockout_report(model, processor, args.n, args.seed))
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        example_scene().image.save(out)
        logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
