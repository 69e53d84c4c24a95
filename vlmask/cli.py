"""The ``vlmask`` command line: ``vlmask run ...``.

User mistakes end in one line on stderr and exit status 2, with no output file left.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import transformers
import xarray as xr

from vlmask._errors import VlmaskError
from vlmask._inputs import CHAT_TEMPLATE_MODES, read_image
from vlmask._masks import VISION_ATTENTION, parse_indices
from vlmask._model import DTYPES, load_model
from vlmask._results import FORMATS, save_results, write_tables
from vlmask._sweep import sweep
from vlmask.builtin import DEFAULT_MODEL_PATH

log = logging.getLogger("vlmask")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmask", description="Attention knockout for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="block each chosen token in turn and measure what changes")
    run.add_argument("--model", help="hub id or checkpoint directory (default: the built-in toy model)")
    run.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    run.add_argument("--prompt", required=True, help="the question or text")
    run.add_argument("--num-tokens", type=int, default=1, help="greedy clean continuation length = steps (default 1)")
    run.add_argument("--mask", default="text", help="text (default), vision, all, or positions like 18:24,30")
    run.add_argument("--layers", help="decoder layers where keys are blocked, like 0:4,7 (default: all)")
    run.add_argument("--chat-template", choices=CHAT_TEMPLATE_MODES, default="auto")
    run.add_argument(
        "--vision-attention",
        choices=VISION_ATTENTION,
        default="native",
        help="native (Qwen3-VL: causal over image tokens) or bidirectional (NOT native; prototype's)",
    )
    run.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    run.add_argument("--device", default="cpu")
    run.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa")
    run.add_argument("--batch-size", type=int, default=8, help="knockouts per forward pass (default 8)")
    run.add_argument("--output", default="run", help="result name: writes OUTPUT_DIR/NAME.nc (default run)")
    run.add_argument("--output-dir", default="output")
    run.add_argument("--format", default="nc", help=f"comma-separated, some of {','.join(FORMATS)} (nc always)")
    run.add_argument("--overwrite", action="store_true", help="replace existing result files")
    run.add_argument("--top", type=int, default=10, help="rows in the printed ranking (default 10)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def _targets(args: argparse.Namespace) -> tuple[Path, list[str]]:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise VlmaskError(f"--format {bad[0]!r} is not known: expected some of {','.join(FORMATS)}")
    if not args.output or Path(args.output).name != args.output:
        raise VlmaskError(f"--output {args.output!r} must be a plain name; use --output-dir for the folder")
    stem = Path(args.output_dir) / args.output
    for fmt in ["nc", *formats]:
        path = stem.with_suffix(f".{fmt}")
        if path.exists() and not args.overwrite:
            raise VlmaskError(f"output '{path}' already exists: choose another --output or pass --overwrite")
    return stem, formats


def _print_tokens(ds: xr.Dataset) -> None:
    print(f"model input ({ds.sizes['seq']} tokens, chat template {ds.attrs['chat_template']}):")
    print(f"  {'pos':>4}  {'kind':<7} {'img':>3}  token")
    for pos in ds["seq"].values:
        row = ds.sel(seq=pos)
        image = int(row["seq_image"]) if int(row["seq_image"]) >= 0 else ""
        print(f"  {pos:>4}  {row['seq_kind'].item()!s:<7} {image!s:>3}  {row['seq_text'].item()!r}")
    ranges = _vision_ranges(ds)
    if ranges:
        for image, (start, end) in ranges:
            print(f"vision tokens: positions {start}-{end - 1} ({end - start} tokens, image {image})")
    else:
        print("vision tokens: none")


def _vision_ranges(ds: xr.Dataset) -> list[tuple[int, tuple[int, int]]]:
    ranges = json.loads(ds.attrs["vision_ranges"])
    return [(int(ds["seq_image"].values[start]), (start, end)) for start, end in ranges]


def _print_ranking(ds: xr.Dataset, top: int) -> None:
    kl = ds["kl"].mean("step")
    order = kl.sortby(kl, ascending=False)["token"].values[:top]
    print(f"clean continuation: {ds.attrs['clean_continuation']!r}")
    print(f"top {len(order)} of {ds.sizes['token']} masked tokens by KL(clean || masked), mean over steps:")
    print(f"  {'pos':>4}  {'token':<16} {'kind':<7} {'KL':>9} {'logp drop':>9} {'dP %':>8}  masked continuation")
    for pos in order:
        row = ds.sel(token=pos)
        print(
            f"  {pos:>4}  {row['token_text'].item()!r:<16} {row['token_kind'].item():<7}"
            f" {float(row['kl'].mean()):>9.4f} {float(row['logprob_drop'].mean()):>9.4f}"
            f" {float(row['prob_change_pct'].mean()):>8.2f}  {row['masked_continuation'].item()!r}"
        )


def run(args: argparse.Namespace) -> int:
    stem, formats = _targets(args)
    if not args.prompt.strip():
        raise VlmaskError("the prompt is empty: pass --prompt with some text")
    for image in args.image:
        read_image(image)
    vl = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation)
    if vl.builtin:
        print(f"model: built-in toy checkpoint {DEFAULT_MODEL_PATH.name} (see its README.md); --model for a real one")
    layers = None if args.layers is None else parse_indices(args.layers, vl.num_layers, "layer")
    ds = sweep(
        vl,
        args.prompt,
        args.image,
        mask=args.mask,
        num_tokens=args.num_tokens,
        layers=layers,
        chat_template=args.chat_template,
        vision_attention=args.vision_attention,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    path = save_results(ds, stem.with_suffix(".nc"), overwrite=args.overwrite)
    written = [path, *write_tables(ds, stem, formats, overwrite=args.overwrite)]
    _print_tokens(ds)
    _print_ranking(ds, args.top)
    for out in written:
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmask`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    transformers.utils.logging.disable_progress_bar()
    if not args.verbose:
        transformers.utils.logging.set_verbosity_error()
    try:
        return run(args)
    except VlmaskError as err:
        print(f"vlmask: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmask: interrupted; no result written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
