"""Time knockout sweeps: naive full reruns vs vlmask, on the same inputs, in one run.

    python -m benchmarks.sweep                          # S1-S4 on an 8-layer, hidden-512 model, CPU
    python -m benchmarks.sweep --scenario S1 --json out.json
    python -m benchmarks.sweep --size 2b --device cuda  # the Qwen3-VL-2B architecture (random weights)

Methods, each run in its own process (so peak memory is its own) after a short warm-up, strictly
interleaved (naive, naive-nnsight, hooks, vlmask, naive, ...) ``--repeats`` times, with the same
explicit thread count (``--threads``, recorded); each figure is the median, with its range:

- naive: the old prototype's method. At every step, one full forward through plain
  transformers per masked token (vision encoder included) with a hand-built 4D mask
  given to every decoder layer by a forward pre-hook, plus the clean pass; and, as vlmask
  does, each knockout's greedy continuation (extra full passes once it leaves the clean one).
- naive-nnsight: the same work, one nnsight trace per masked token, no reuse.
- hooks: ``vlmask.sweep(..., backend="hooks")``: the same algorithm with plain PyTorch hooks
  instead of nnsight traces, to price nnsight itself.
- vlmask: ``vlmask.sweep`` as shipped.
- vlmask-dense: the same, with ``VLMASK_PACKED_ATTENTION=dense``: each packed pass computes
  attention in one call over the whole pack (the method before per-row segments), to price them.
- vlmask-before (with ``--before REV``): ``vlmask.sweep`` with the package as of git commit REV
  (its files extracted beside this benchmark), interleaved with the rest, to price a change in one run.

Every method's KL and log-prob drop must agree with naive to 1e-4, and its masked
continuations token for token, or the run fails.
"ideal" and "needed" price the least work a sweep must do (benchmarks/needed.py has both):
"ideal" at the language decoder's cost per position in the clean pass; "needed" by the work
itself, measured with the same kernels: the prompt's forward, each knockout's teacher-forced
positions (up to where its own continuation leaves the clean one) at their linear layers' cost
plus attention over only the query-key pairs the knockout allows, and, greedy decoding being
sequential, one raw cached step per further token over the clean row and every knockout that has
left by then. So a pass that spends time on masked-out pairs cannot look ideal, nor can
sequential steps be priced as if batched.
"needed (no steps)" is the earlier, looser figure (everything teacher-forced), kept beside it.

``--triage [K]``: triage (estimate every knockout, confirm the top K exactly) against the
exhaustive exact sweep on S2, and on S5 (1,024 vision knockouts; see benchmarks/triage.py).

vlmask's runs also report where the time goes (``vlmask.engine.stages``: vision encoder, clean
pass, packed passes, generation, assembly; medians over the runs), and one decoder pass of one
position (a generation step, logits only) through vlmask against the raw model's own cached step.

``--quick`` (CI's smoke test): the tiny model, S1, one repeat, one thread; timings meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

import vlmask
from benchmarks.needed import ideals, needed_figures, sync, with_types
from vlmask.builtin import make_processor, tiny_config, words_of
from vlmask.engine.nnsight_backend import envoy
from vlmask.inputs.prompt import build_prompt
from vlmask.inputs.selection import parse_mask
from vlmask.model.attention import attention_mask

QUESTION = "what is the color of the object in the middle of this picture and what is its shape ?"
FILLER = [f"w{i}" for i in range(100)]
SCENARIOS = {
    "S1": {"image": True, "mask": "prompt", "steps": 1, "words": 0},
    "S2": {"image": True, "mask": "vision", "steps": 1, "words": 0},
    "S3": {"image": False, "mask": "all", "steps": 1, "words": 505, "naive_sample": 64},
    "S4": {"image": True, "mask": "prompt", "steps": 8, "words": 0},
}
SIZES = {
    "tiny": {  # for the smoke test: every code path in seconds, timings meaningless
        "hidden_size": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 128,
        "vision_hidden": 32,
        "vision_depth": 1,
        "vocab": None,
    },
    "small": {
        "hidden_size": 512,
        "layers": 8,
        "heads": 8,
        "kv_heads": 4,
        "intermediate": 1536,
        "vision_hidden": 256,
        "vision_depth": 4,
        "vocab": None,
    },
    "2b": {
        "hidden_size": 2048,
        "layers": 28,
        "heads": 16,
        "kv_heads": 8,
        "intermediate": 6144,
        "vision_hidden": 1024,
        "vision_depth": 24,
        "vocab": 151936,
    },
}
METHODS = ("naive", "naive-nnsight", "hooks", "vlmask", "vlmask-dense")
BEFORE = "vlmask-before"  # vlmask.sweep from another commit's engine (--before REV), its own process
VLMASK = ("vlmask", "vlmask-dense")  # the methods that report stages, ideals and the one-position pass
QUICK = 5.0  # seconds: within one worker, a method whose first run is quicker runs 3 times (median)


def build_model(root: Path, size: str) -> None:
    spec = SIZES[size]
    processor = make_processor(words_of([QUESTION, *FILLER]))
    config = tiny_config(
        spec["vocab"] or len(processor.tokenizer),
        hidden_size=spec["hidden_size"],
        layers=spec["layers"],
        heads=spec["heads"],
        kv_heads=spec["kv_heads"],
        vision_hidden=spec["vision_hidden"],
        vision_depth=spec["vision_depth"],
    )
    config.text_config.intermediate_size = spec["intermediate"]
    # peaky logits, so knockouts visibly move the distribution and agreement with naive means something
    # (timings do not depend on weight values)
    config.text_config.initializer_range = 0.2
    config.text_config.head_dim = spec["hidden_size"] // spec["heads"]
    if size == "2b":
        config.vision_config.deepstack_visual_indexes = [5, 11, 17]
        config.vision_config.num_heads = 16
        config.vision_config.intermediate_size = 4096
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(root)
    processor.save_pretrained(root)


def prompt_of(name: str) -> str:
    words = SCENARIOS[name]["words"]
    return " ".join(FILLER[i % len(FILLER)] for i in range(words)) if words else QUESTION


def _positions(vl, prompt, images, mask) -> list[int]:
    built = build_prompt(vl.processor, prompt, images)
    return parse_mask(mask, built.tokens.kind, built.prompt_positions)


def sampled(positions: list[int], sample: int | None) -> list[int]:
    """``sample`` positions spread evenly over ``positions`` (all of them if None or more)."""
    if not sample or sample >= len(positions):
        return positions
    return (
        [positions[round(k * (len(positions) - 1) / (sample - 1))] for k in range(sample)]
        if sample > 1
        else [positions[0]]
    )


def _knockout_loop(vl, prompt, images, mask, steps, masked_logits, sample=None) -> dict:
    """Shared skeleton of both naive methods: every step, the clean pass and one pass per token.

    Like vlmask, it also returns each knockout's greedy continuation: while it still
    equals the clean one, the teacher-forced pass is also the free-running one; after it
    leaves, each further token costs one more full pass on the knockout's own sequence.
    With ``sample``, only that many knockouts (spread evenly) run: a naive pass costs the
    same whichever token it blocks, so the worker scales the time up to all of them.
    """
    built = build_prompt(vl.processor, prompt, images)
    inputs = {k: v.to(vl.device) for k, v in built.inputs.items() if k != "attention_mask"}
    positions = sampled(parse_mask(mask, built.tokens.kind, built.prompt_positions), sample)
    ids = inputs["input_ids"]
    kl = torch.zeros(len(positions), steps)
    drop = torch.zeros(len(positions), steps)
    own: list[list[int]] = [[] for _ in positions]
    clean_ids: list[int] = []
    vl.hf.model.rope_deltas = None
    clean_seconds = 0.0

    def blocked(seq_len: int, p: int) -> torch.Tensor:
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=vl.device).tril()
        allowed[p + 1 :, p] = False
        return allowed

    with torch.inference_mode():
        for step in range(steps):
            full = with_types(inputs, ids)
            tic = time.perf_counter()
            clean_logits = vl.hf(**full).logits[0, -1].float()
            clean_seconds += time.perf_counter() - tic
            clean = torch.log_softmax(clean_logits, -1)
            top = int(clean.argmax())
            for row, p in enumerate(positions):
                masked = torch.log_softmax(masked_logits(vl, full, blocked(ids.shape[1], p)).float(), -1)
                kl[row, step] = (clean.exp() * (clean - masked)).sum()
                drop[row, step] = clean[top] - masked[top]
                if own[row] == clean_ids:  # not left yet: this pass is also the free-running one
                    own[row].append(int(masked.argmax()))
                else:
                    mine = torch.cat([inputs["input_ids"], torch.tensor([own[row]], dtype=ids.dtype)], 1)
                    logits = masked_logits(vl, with_types(inputs, mine), blocked(mine.shape[1], p))
                    own[row].append(int(logits.argmax()))
            clean_ids.append(top)
            ids = torch.cat([ids, clean_logits.argmax().view(1, 1)], 1)
    out = {"kl": kl.tolist(), "logprob_drop": drop.tolist(), "masked_ids": own, "positions": positions}
    return {**out, "clean_seconds": clean_seconds}


def _hooked_logits(vl, full: dict, allowed: torch.Tensor) -> torch.Tensor:
    mask = (
        allowed[None, None]
        if vl.attn_implementation == "sdpa"
        else torch.zeros(allowed.shape, dtype=vl.dtype, device=vl.device).masked_fill(
            ~allowed, torch.finfo(vl.dtype).min
        )[None, None]
    )
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, k, mask=mask: (a, {**k, "attention_mask": mask}), with_kwargs=True
        )
        for layer in vl.hf.model.language_model.layers
    ]
    try:
        return vl.hf(**full).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()


def _traced_logits(vl, full: dict, allowed: torch.Tensor) -> torch.Tensor:
    mask = attention_mask(allowed[None], vl.attn_implementation, vl.dtype).to(vl.device)
    traced = envoy(vl)
    with traced.trace(**full):
        for layer in traced.model.language_model.layers:
            args, kwargs = layer.self_attn.inputs
            kwargs["attention_mask"] = mask
            layer.self_attn.inputs = (args, kwargs)
        logits = traced.output.logits[0, -1].save()
    return logits


def _vlmask(vl, prompt, images, mask, steps, batch_size, backend="nnsight") -> dict:
    ds = vlmask.sweep(
        vl, prompt, images, mask=mask, num_tokens=steps, batch_size=batch_size, progress=False, backend=backend
    )
    out = {name: ds[name].transpose("token", "step").values.tolist() for name in ("kl", "logprob_drop")}
    masked = ds["masked_token_id"].transpose("token", "step").values.tolist()
    clean = ds["step_token_id"].values.tolist()
    return {**out, "masked_ids": masked, "clean_ids": clean, "positions": ds["token"].values.tolist()}


def _stage_names() -> tuple[str, ...]:
    from vlmask.engine.stages import STAGES  # not at the top: a --before engine may predate it

    return STAGES


class _StageTimes(logging.Handler):
    """Sums the seconds of each stage that ``vlmask.stages`` logs (see :mod:`vlmask.engine.stages`)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(logging.DEBUG)
        self.seconds = dict.fromkeys(names, 0.0)

    def emit(self, record: logging.LogRecord) -> None:
        self.seconds[record.stage] += record.seconds


@contextlib.contextmanager
def _timing_stages(on: bool) -> Iterator[_StageTimes]:
    """Collect ``vlmask.stages``' records while in the block (``on``; else nothing is timed)."""
    handler, logger = _StageTimes(_stage_names() if on else ()), logging.getLogger("vlmask.stages")
    if not on:
        yield handler
        return
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def worker(args: argparse.Namespace) -> None:
    """One method on one scenario, in this process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    vl = vlmask.load_model(args.model, device=args.device)
    sc = SCENARIOS[args.scenario]
    images = [args.image] if sc["image"] else []
    prompt = prompt_of(args.scenario)
    sample = sc.get("naive_sample") if args.naive_sample is None else args.naive_sample
    mask = sc["mask"]
    if args.limit:  # the first ``limit`` of the scenario's knockouts
        mask = ",".join(map(str, _positions(vl, prompt, images, mask)[: args.limit]))
    shipped = lambda: _vlmask(vl, prompt, images, mask, sc["steps"], args.batch_size)  # noqa: E731
    run = {  # vlmask-dense and vlmask-before: the same call, under the env switch or from the extracted engine
        "naive": lambda: _knockout_loop(vl, prompt, images, mask, sc["steps"], _hooked_logits, sample),
        "naive-nnsight": lambda: _knockout_loop(vl, prompt, images, mask, sc["steps"], _traced_logits, sample),
        "hooks": lambda: _vlmask(vl, prompt, images, mask, sc["steps"], args.batch_size, backend="hooks"),
        "vlmask": shipped,
        "vlmask-dense": shipped,
        BEFORE: shipped,
    }[args.method]
    if args.method == "vlmask-dense":
        os.environ["VLMASK_PACKED_ATTENTION"] = "dense"
    _knockout_loop(vl, "w1 w2", [], "0", 1, _traced_logits)  # warm-up: first-call costs of torch and nnsight
    vlmask.sweep(vl, "w1 w2 w3", [], mask="all", num_tokens=2, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if vl.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if vl.device.type == "cuda" else 0
    times, stages = [], []
    while not times or (sum(times) < QUICK and len(times) < 3):  # quick methods: the median of 3 runs
        sync(vl)
        start = time.perf_counter()
        with _timing_stages(args.method in VLMASK) as timed:
            result = run()
        sync(vl)
        times.append(time.perf_counter() - start)
        stages.append(timed.seconds)
    seconds = float(np.median(times))
    if vl.device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    built = build_prompt(vl.processor, prompt, images)
    positions = _positions(vl, prompt, images, mask)
    seq = len(built.tokens) + sc["steps"] - 1
    measured = len(result["positions"])
    clean = result.pop("clean_seconds", 0.0)  # naive's clean passes run once whatever the sample
    out = {
        "seconds": clean + (seconds - clean) * len(positions) / measured,
        "measured_knockouts": measured,
        "runs": len(times),
        "peak_extra_mib": peak,
        **result,
        "tokens": len(built.tokens),
        "knockouts": len(positions),
        "recomputed": sum(seq - p - 1 for p in positions),
        "seq": seq,
    }
    if args.method in VLMASK:
        out["stages_s"] = {name: float(np.median([run[name] for run in stages])) for name in _stage_names()}
    if args.method == "vlmask":
        out.update(needed_figures(result, vl, prompt, images, sc["steps"], len(built.tokens)))
    out["threads"] = torch.get_num_threads()
    out["vlmask_file"] = vlmask.__file__  # which engine ran (--before: the extracted one)
    print("RESULT " + json.dumps(out))


def _spawn(
    method: str, scenario: str, model: Path, image: Path, args: argparse.Namespace, limit: int | None = None
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.sweep",
        "--worker",
        method,
        "--scenario",
        scenario,
        "--model",
        str(model),
        "--image",
        str(image),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.naive_sample is not None:
        cmd += ["--naive-sample", str(args.naive_sample)]
    if limit:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cwd = args.before_root if method == BEFORE else None  # its vlmask first on the path
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=cwd)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{method} on {scenario} failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if method == BEFORE and not Path(result["vlmask_file"]).resolve().is_relative_to(Path(cwd).resolve()):
        raise SystemExit(f"{BEFORE} ran the engine at {result['vlmask_file']}, not the one in {cwd}")
    return result


def _engine_at(rev: str, root: Path) -> Path:
    """A folder with the package (vlmask, interventions) as of git commit ``rev`` and this benchmark beside it."""
    repo = Path(__file__).resolve().parents[1]
    root.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "vlmask", "interventions"], capture_output=True, check=False
    )
    if archive.returncode:
        raise SystemExit(f"--before {rev!r}: git archive failed: {archive.stderr.decode()[-500:]}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    shutil.copytree(repo / "benchmarks", root / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root)], check=True)  # not inside a timed run
    return root


def _disagreement(res: dict, naive: dict) -> float:
    """Largest KL / log-prob-drop difference from naive, over the knockouts both measured;
    their greedy continuations under each knockout must be the same tokens."""
    rows = {p: k for k, p in enumerate(res["positions"])}
    common = [(rows[p], k) for k, p in enumerate(naive["positions"]) if p in rows]
    if not common:
        raise SystemExit("no knockout measured by both methods")
    ours, theirs = [r for r, _ in common], [k for _, k in common]
    if [res["masked_ids"][r] for r in ours] != [naive["masked_ids"][k] for k in theirs]:
        raise SystemExit("a method's masked continuations differ from naive's")
    return max(
        float(np.abs(np.array(res[name])[ours] - np.array(naive[name])[theirs]).max())
        for name in ("kl", "logprob_drop")
    )


def memory_study(model: Path, image: Path, args: argparse.Namespace) -> None:
    """Peak memory of vlmask on S2's vision knockouts: batch sizes 1-32 at 196 knockouts, then 24-196 knockouts at 8."""
    runs = [(b, None) for b in (1, 4, 8, 16, 32)] + [(8, n) for n in (24, 48, 96)]
    rows = []
    for batch, limit in runs:
        args.batch_size = batch
        res = _spawn("vlmask", "S2", model, image, args, limit)
        rows.append(
            {
                "batch_size": batch,
                "knockouts": res["knockouts"],
                "seconds": round(res["seconds"], 2),
                "peak_extra_mib": round(res["peak_extra_mib"], 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'batch':>6}{'knockouts':>10}{'seconds':>9}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['batch_size']:>6}{r['knockouts']:>10}{r['seconds']:>9.2f}{r['peak_extra_mib']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": _machine(args), "size": args.size, "memory": rows}, indent=2))


def _machine(args: argparse.Namespace) -> str:
    return f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs, {args.threads} threads, {args.device}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=sorted([*SCENARIOS, "S5"]))
    parser.add_argument("--method", action="append", choices=METHODS)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--naive-sample",
        type=int,
        help="naive methods run only this many knockouts (spread evenly), their time scaled to all "
        "(default: 64 for S3, whose naive run alone takes ~10 minutes on 2 cores; 0 = all)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        help="torch threads in every method's process (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs of every method; figures are medians (default 3)"
    )
    parser.add_argument("--quick", action="store_true", help="CI's smoke test: tiny model, S1, one repeat, 1 thread")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--memory-study",
        action="store_true",
        help="instead: vlmask's peak memory on S2 as the batch size grows, and as the knockouts grow at one batch size",
    )
    parser.add_argument(
        "--triage",
        type=int,
        nargs="?",
        const=20,
        help="instead: triage with this K (default 20) vs the exhaustive exact sweep, S2 and S5 (benchmarks/triage.py)",
    )
    parser.add_argument(
        "--triage-s5-sample",
        type=int,
        default=0,
        help="S5's exhaustive sweep extrapolated from this many exact knockouts (default 0: run it in full, ~200 s)",
    )
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--before",
        metavar="REV",
        help=f"also run {BEFORE}: vlmask.sweep with the engine of this git commit (e.g. the one before a change), "
        "interleaved with the others, to price the change in one run",
    )
    parser.add_argument("--worker", choices=[*METHODS, BEFORE], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    return parser


def _scenario_row(scenario: str, runs: dict[str, list[dict]]) -> dict:
    """One scenario's summary from each method's interleaved runs; fails if any run disagrees with naive."""
    naive = runs["naive"][0]
    for results in runs.values():
        for res in results:
            err = _disagreement(res, naive)
            if err > 1e-4:
                raise SystemExit(f"{scenario}: {res['method']} disagrees with naive by {err:.2e}")
            res["max_abs_diff_vs_naive"] = err
    seconds = {m: [r["seconds"] for r in results] for m, results in runs.items()}
    median = {m: float(np.median(times)) for m, times in seconds.items()}
    row = {
        "scenario": scenario,
        "tokens": naive["tokens"],
        "knockouts": naive["knockouts"],
        "steps": SCENARIOS[scenario]["steps"],
        "max_kl": float(np.max(naive["kl"])),
        "threads": naive["threads"],
        "repeats": len(seconds["naive"]),
    }
    for method, results in runs.items():
        row[f"{method}_s"] = round(median[method], 3)
        row[f"{method}_range_s"] = [round(min(seconds[method]), 3), round(max(seconds[method]), 3)]
        row[f"{method}_peak_mib"] = round(max(r["peak_extra_mib"] for r in results), 1)
        row[f"{method}_speedup"] = round(median["naive"] / median[method], 2)
        row[f"{method}_max_diff"] = max(r["max_abs_diff_vs_naive"] for r in results)
        if results[0]["measured_knockouts"] != results[0]["knockouts"]:
            row[f"{method}_measured_knockouts"] = results[0]["measured_knockouts"]
    if "vlmask" in runs:
        row.update(ideals(runs["vlmask"], median))
    if "vlmask" in runs and "hooks" in runs:
        row["nnsight_overhead"] = round(median["vlmask"] / median["hooks"] - 1, 3)
    if "vlmask" in runs and BEFORE in runs:
        row["vs_before"] = round(median["vlmask"] / median[BEFORE], 3)
    if "vlmask" in runs and "vlmask-dense" in runs:
        row["segments_vs_dense"] = round(median["vlmask"] / median["vlmask-dense"], 3)
    for method in VLMASK:
        if method in runs:
            stages = {name: float(np.median([r["stages_s"][name] for r in runs[method]])) for name in _stage_names()}
            row[f"{method}_stages_s"] = {name: round(t, 3) for name, t in stages.items()}
    if "vlmask" in runs:
        ours, raw = (float(np.median([r[k] for r in runs["vlmask"]])) for k in ("one_position_s", "raw_one_position_s"))
        row["one_position_ms"], row["raw_one_position_ms"] = round(1000 * ours, 2), round(1000 * raw, 2)
        row["one_position_vs_raw"] = round(ours / raw, 3)
    return row


def _print_table(rows: list[dict], methods: list[str]) -> None:
    header = f"{'':<4}{'tokens':>7}{'KOs':>5}{'steps':>6}" + "".join(f"{m + ' s (range)':>24}" for m in methods)
    print(
        header + f"{'ideal s':>9}{'needed s':>9}{'vlmask vs naive':>17}{'vs ideal':>10}{'vs needed':>10}"
        f"{'nnsight cost':>14}{'vs dense packs':>18}{'vs before':>11}"
    )
    for r in rows:
        line = f"{r['scenario']:<4}{r['tokens']:>7}{r['knockouts']:>5}{r['steps']:>6}"
        for m in methods:
            low, high = r[f"{m}_range_s"]
            line += f"{r[m + '_s']:.2f} ({low:.2f}-{high:.2f})".rjust(24)
        if "ideal_s" in r:
            line += f"{r['ideal_s']:>9.2f}{r['needed_s']:>9.2f}{r['vlmask_speedup']:>16.1f}x"
            line += f"{r['vlmask_efficiency']:>9.0%}{r['vlmask_vs_needed']:>10.0%}"
        if "nnsight_overhead" in r:
            line += f"{r['nnsight_overhead']:>+14.0%}"
        if "segments_vs_dense" in r:
            line += f"{r['segments_vs_dense']:>17.2f}x"
        if "vs_before" in r:
            line += f"{r['vs_before']:>10.2f}x"
        print(line)
    _print_stages(rows)
    print(
        f"threads: {rows[0]['threads'] if rows else '?'}; medians of {rows[0]['repeats'] if rows else '?'} "
        "interleaved runs, range in brackets"
    )


def _print_stages(rows: list[dict]) -> None:
    """Where vlmask's time goes, per scenario and method (medians), and one generation step against the raw model's."""
    names = _stage_names()
    print(f"{'':<4}{'method':<14}" + "".join(f"{name + ' s':>18}" for name in names) + f"{'1-position ms (raw)':>22}")
    for r in rows:
        for method in VLMASK:
            if f"{method}_stages_s" not in r:
                continue
            stages = r[f"{method}_stages_s"]
            line = f"{r['scenario']:<4}{method:<14}"
            line += "".join(f"{stages[name]:.2f} ({stages[name] / r[method + '_s']:.0%})".rjust(18) for name in names)
            if method == "vlmask":
                ours, raw, ratio = r["one_position_ms"], r["raw_one_position_ms"], r["one_position_vs_raw"]
                line += f"{ours:.1f} ({raw:.1f}) {ratio:.2f}x".rjust(22)
            print(line)


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if "S5" in (args.scenario or []) and not args.triage:
        parser.error("scenario S5 (1,024 vision knockouts) is a triage scenario: give --triage too")
    if args.worker:
        args.method = args.worker
        args.scenario = args.scenario[0]
        worker(args)
        return
    if args.quick:
        args.size, args.repeats, args.threads = "tiny", 1, 1
        args.scenario = args.scenario or ["S1"]
    methods = args.method or list(METHODS)
    if "naive" not in methods:
        methods = ["naive", *methods]
    methods += [BEFORE] if args.before else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, image = Path(tmp) / "model", Path(tmp) / "image.png"
        build_model(model, args.size)
        pixels = np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
        if args.memory_study:
            memory_study(model, image, args)
            return
        if args.triage:
            from benchmarks.triage import study

            torch.set_num_threads(args.threads)
            chosen = tuple(args.scenario or ("S2", "S5"))
            rows = study(model, Path(tmp), args.triage, args.triage_s5_sample or None, chosen)
            if args.json:
                args.json.write_text(
                    json.dumps({"machine": _machine(args), "size": args.size, "triage": rows}, indent=2)
                )
            return
        if args.before:
            args.before_root = _engine_at(args.before, Path(tmp) / "before")
        for scenario in args.scenario or sorted(SCENARIOS):
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(args.repeats):  # strictly interleaved: a drifting machine moves every method alike
                for m in methods:
                    runs[m].append({**_spawn(m, scenario, model, image, args), "method": m})
            rows.append(_scenario_row(scenario, runs))
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "machine": _machine(args),
        "size": args.size,
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "before": args.before,
        "results": rows,
    }
    _print_table(rows, methods)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
