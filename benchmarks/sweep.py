"""Time a knockout sweep: the naive full rerun per masked token vs vlmask, same inputs, same run.

    python -m benchmarks.sweep                 # all scenarios, 8 layers x hidden 512, random weights
    python -m benchmarks.sweep --scenario S1 --json out.json

naive = the old prototype's method: for each masked token, a full forward through plain
transformers (vision encoder included) with a hand-built 4D mask on every layer, then the
same metrics. Results of both are checked against each other (1e-4) before timing counts.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

import vlmask
from vlmask._inputs import build_prompt
from vlmask._masks import parse_mask
from vlmask.builtin import make_processor, tiny_config, words_of

QUESTION = "what is the color of the object in the middle of this picture and what is its shape ?"
SCENARIOS = {
    "S1": {"image": 448, "mask": "text", "steps": 1, "text_words": 0},
    "S2": {"image": 448, "mask": "vision", "steps": 1, "text_words": 0},
    "S3": {"image": 0, "mask": "all", "steps": 1, "text_words": 500},
    "S4": {"image": 448, "mask": "text", "steps": 8, "text_words": 0},
}


def _model(root: Path, words: list[str]) -> vlmask.VLModel:
    processor = make_processor(words)
    config = tiny_config(
        len(processor.tokenizer), hidden_size=512, layers=8, heads=8, kv_heads=4, vision_hidden=256, vision_depth=4
    )
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(root)
    processor.save_pretrained(root)
    return vlmask.load_model(root)


def _naive(vl: vlmask.VLModel, prompt: str, images: list[str], mask: str, steps: int) -> np.ndarray:
    """The prototype's method; returns KL (token, step) for the equality check.

    At every step, the clean pass and one full pass per masked token (vision encoder
    included), each with a hand-built 4D mask handed to every decoder layer.
    """
    built = build_prompt(vl.processor, prompt, images)
    inputs = {k: v for k, v in built.inputs.items() if k != "attention_mask"}
    positions = parse_mask(mask, built.tokens.kind)
    layers = vl.hf.model.language_model.layers
    ids = inputs["input_ids"]
    kls = torch.zeros(len(positions), steps)
    with torch.inference_mode():
        for step in range(steps):
            seq = ids.shape[1]
            full = {**inputs, "input_ids": ids, "mm_token_type_ids": _types(inputs, ids)}
            clean_logits = vl.hf(**full).logits[0, -1].float()
            clean = torch.log_softmax(clean_logits, -1)
            for row, p in enumerate(positions):
                allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
                allowed[p + 1 :, p] = False
                hooks = [
                    layer.self_attn.register_forward_pre_hook(
                        lambda m, a, k, mask4d=allowed[None, None]: (a, {**k, "attention_mask": mask4d}),
                        with_kwargs=True,
                    )
                    for layer in layers
                ]
                masked = torch.log_softmax(vl.hf(**full, output_hidden_states=True).logits[0, -1].float(), -1)
                for h in hooks:
                    h.remove()
                kls[row, step] = (clean.exp() * (clean - masked)).sum()
            ids = torch.cat([ids, clean_logits.argmax().view(1, 1)], 1)
    return kls.numpy()


def _types(inputs: dict, ids: torch.Tensor) -> torch.Tensor:
    types = inputs["mm_token_type_ids"]
    return torch.cat([types, types.new_zeros(1, ids.shape[1] - types.shape[1])], 1)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    filler = [f"w{i}" for i in range(100)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vl = _model(root / "model", words_of([QUESTION, *filler]))
        rng = np.random.default_rng(0)
        image = root / "img.png"
        Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)).save(image)
        rows = []
        for name in args.scenario or sorted(SCENARIOS):
            sc = SCENARIOS[name]
            prompt = " ".join(filler[i % 100] for i in range(sc["text_words"])) or QUESTION
            images = [str(image)] if sc["image"] else []
            naive, t_naive = _timed(_naive, vl, prompt, images, sc["mask"], sc["steps"])
            ds, t_fast = _timed(
                vlmask.sweep,
                vl,
                prompt,
                images,
                mask=sc["mask"],
                num_tokens=sc["steps"],
                batch_size=args.batch_size,
                progress=False,
            )
            err = float(np.abs(ds["kl"].transpose("token", "step").values - naive).max())
            if err > 1e-4:
                raise SystemExit(f"{name}: vlmask and naive disagree by {err:.2e}")
            rows.append(
                {
                    "scenario": name,
                    "tokens": int(ds.sizes["seq"]),
                    "knockouts": int(ds.sizes["token"]),
                    "steps": sc["steps"],
                    "naive_s": round(t_naive, 3),
                    "vlmask_s": round(t_fast, 3),
                    "speedup": round(t_naive / t_fast, 2),
                    "max_abs_kl_diff": err,
                    "max_kl": float(naive.max()),
                }
            )
            print(f"{name}: {rows[-1]}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "peak_rss_mib": round(peak),
        "results": rows,
    }
    print(f"{'scenario':<9}{'tokens':>7}{'knockouts':>10}{'steps':>6}{'naive s':>9}{'vlmask s':>9}{'speed-up':>9}")
    for r in rows:
        print(
            f"{r['scenario']:<9}{r['tokens']:>7}{r['knockouts']:>10}{r['steps']:>6}{r['naive_s']:>9.2f}"
            f"{r['vlmask_s']:>9.2f}{r['speedup']:>8.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
