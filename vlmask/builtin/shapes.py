"""Training the built-in checkpoint on the shapes world (:mod:`vlmask.builtin.world`), and its command line.

The knockout ground truth it is checked against lives in :mod:`vlmask.builtin.ground_truth`; the
shipped checkpoint's two training commands are in its model card (``vlmask/builtin/shapes/README.md``).

Command line (deterministic, CPU)::

    python -m vlmask.builtin.shapes train [--out DIR] [--steps N]
    python -m vlmask.builtin.shapes evaluate [--model DIR] [--n 500] [--seed S]
    python -m vlmask.builtin.shapes knockout [--model DIR] [--n 100] [--seed S]
    python -m vlmask.builtin.shapes content [--model DIR] [--n 1000] [--seed S]
    python -m vlmask.builtin.shapes example [--out examples/shapes.png]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmask.builtin import DEFAULT_MODEL_PATH, tiny_config
from vlmask.builtin.ground_truth import (
    batch_block_mask,
    content_position,
    content_report,
    keys_blocked,
    knockout_report,
)
from vlmask.builtin.world import (
    EVAL_SEED,
    GRID,
    KNOCKOUT_SEED,
    NUM_VISION_TOKENS,
    QUESTION_KINDS,
    TRAIN_SEED,
    VISION_START,
    Scene,
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
    blocked_fraction: float = 0.25
    blocked_weight: float = 1.0
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
    init: str = ""
    """A checkpoint directory to start from (fine-tuning); empty: fresh weights from the sizes above."""


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


def _candidates(scene: Scene) -> list[str]:
    """The answers ``scene``'s question could have before its content word is read: every colour
    (colour questions) or every shape type (shape questions) in the image."""
    return [item.color if scene.kind == "color" else item.shape for item in scene.items]


def _blocked_loss(logits, scenes: Sequence[Scene], vocab: dict[str, int]):
    """Training aid: with the content word blocked, the answer should be uniform over :func:`_candidates`.

    ``logits`` are of runs in which no later query reads the content word's key (at every
    decoder layer). Without this the model can leave one class as a default ("cross" in
    colour questions): the three other words are read, and the absence of their signal
    means the fourth, so blocking that fourth word changes nothing.
    """
    import torch

    logp = logits[:, -3].float().log_softmax(-1)
    losses = [-logp[b, [vocab[w] for w in _candidates(s)]].mean() for b, s in enumerate(scenes)]
    return torch.stack(losses).mean()


def _train_step(model, optimizer, scheduler, processor, scenes: list[Scene], config: TrainConfig):
    """One optimiser step on a batch; returns its loss and answer accuracy (floats).

    The batch is ``scenes`` plus, for the first ``blocked_fraction`` of them that ask about
    colour or shape, a copy run with its content word's key blocked (see :func:`_blocked_loss`).
    """
    import torch

    vocab = processor.tokenizer.get_vocab()
    k = round(config.blocked_fraction * len(scenes)) if config.blocked_weight > 0 else 0
    blocked = [s for s in scenes if s.kind != "count"][:k]
    inputs = encode(processor, scenes + blocked, with_answer=True)
    ids, n = inputs["input_ids"], len(scenes)
    if blocked:
        mask = batch_block_mask(ids.shape[1], [[]] * n + [[content_position(s)] for s in blocked], model.dtype)
        with keys_blocked(model, mask):
            logits = model(**inputs).logits
    else:  # the model's own causal mask, as before this aid existed
        logits = model(**inputs).logits
    # loss on the answer (predicted at the prompt's last token) and on <|im_end|> after it
    loss = torch.nn.functional.cross_entropy(
        logits[:n, -3:-1].reshape(-1, logits.shape[-1]).float(), ids[:n, -2:].reshape(-1)
    )
    if config.aux_weight > 0:
        loss = loss + config.aux_weight * _cell_loss(logits[:n], scenes, vocab)
    if blocked:
        loss = loss + config.blocked_weight * _blocked_loss(logits[n:], blocked, vocab)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item(), (logits[:n, -3].argmax(-1) == ids[:n, -2]).float().mean().item()


def train(config: TrainConfig, out: str | Path = DEFAULT_MODEL_PATH) -> dict[str, Any]:
    """Train a model (fresh, or from ``config.init``) on freshly sampled scenes; save it and its processor to ``out``.

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
    if config.init:
        model = Qwen3VLForConditionalGeneration.from_pretrained(config.init)
    else:
        model = Qwen3VLForConditionalGeneration(model_config)
    model.train()
    optimizer, scheduler = _optimizer(model, config)
    start = time.time()
    running = running_acc = None
    bar = tqdm(range(config.steps), desc="train", mininterval=5)
    for step in bar:
        # curriculum: single shapes first (learn to read colour and shape off a vision
        # token), then 1-4 shapes (learn to find the asked-about one)
        counts = (1,) if step < config.single_steps else (1, 2, 3, 4)
        scenes = [sample_scene(rng, counts=counts) for _ in range(config.batch_size)]
        loss, right = _train_step(model, optimizer, scheduler, processor, scenes, config)
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


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    """The command line's parser: one subcommand per job, ``train``'s options from :class:`TrainConfig`."""
    parser = argparse.ArgumentParser(prog="python -m vlmask.builtin.shapes", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the default checkpoint from scratch")
    p_train.add_argument("--out", default=str(DEFAULT_MODEL_PATH))
    defaults = TrainConfig()
    for name in TrainConfig.__dataclass_fields__:
        kind = type(getattr(defaults, name))
        p_train.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name))
    p_train.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    checks = (
        ("evaluate", "held-out accuracy on fresh scenes", 500, EVAL_SEED),
        ("knockout", "check the attention-knockout ground truth", 100, KNOCKOUT_SEED),
        ("content", "check that blocking each question's content word changes the answer", 1000, KNOCKOUT_SEED),
    )
    for name, help_text, n, seed in checks:
        p_check = sub.add_parser(name, help=help_text)
        p_check.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
        p_check.add_argument("--n", type=int, default=n)
        p_check.add_argument("--seed", type=int, default=seed)
    p_ex = sub.add_parser("example", help="write the example image")
    p_ex.add_argument("--out", default="examples/shapes.png")
    return parser


def _evaluate(model_dir: str, n: int, seed: int) -> None:
    """Log held-out accuracy on ``n`` scenes of ``seed``, per kind of question and overall."""
    model, processor = load(model_dir)
    scenes = sample_scenes(n, seed)
    preds = predict(model, processor, scenes)
    for kind in QUESTION_KINDS:
        pairs = [(p, s) for p, s in zip(preds, scenes, strict=False) if s.kind == kind]
        if pairs:
            logger.info("%s: %d/%d right", kind, sum(p == s.answer for p, s in pairs), len(pairs))
    acc = sum(p == s.answer for p, s in zip(preds, scenes, strict=False)) / len(scenes)
    logger.info("held-out accuracy on %d scenes (seed %d): %.4f", n, seed, acc)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmask.builtin.shapes {train,evaluate,knockout,content,example}``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(getattr(args, "threads", 2))
    if args.command == "train":
        fields = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__}
        summary = train(TrainConfig(**fields), args.out)
        logger.info("training summary: %s", summary)
        if not args.no_eval:
            _evaluate(args.out, 500, EVAL_SEED)
            model, processor = load(args.out, attn_implementation="eager")
            logger.info("content words read: %s", content_report(model, processor, 1000, KNOCKOUT_SEED))
    elif args.command == "evaluate":
        _evaluate(args.model, args.n, args.seed)
    elif args.command == "knockout":
        model, processor = load(args.model, attn_implementation="eager")
        logger.info("knockout ground truth: %s", knockout_report(model, processor, args.n, args.seed))
    elif args.command == "content":
        model, processor = load(args.model, attn_implementation="eager")
        logger.info("content words read: %s", content_report(model, processor, args.n, args.seed))
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        example_scene().image.save(out)
        logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
