"""The ``vlmask`` command line: ``vlmask run``, ``heatmap``, ``report``, ``compare`` and ``batch``.

User mistakes end in one line on stderr and exit status 2, with no output file left.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import transformers
import xarray as xr

from vlmask.batch.run import Outcome, parse_shard, run_batch
from vlmask.builtin import DEFAULT_MODEL_PATH
from vlmask.engine.sweep import sweep
from vlmask.errors import VlmaskError
from vlmask.model.attention import MASK_FORMATS
from vlmask.model.load import DTYPES, load_model
from vlmask.results.io import FORMATS, open_results, save_results, write_tables
from vlmask.results.schema import (
    ATTR,
    KL,
    LOGPROB_DROP,
    MASKED_CONTINUATION,
    PROB_CHANGE_PCT,
    SEQ,
    SEQ_COL,
    SEQ_IMAGE,
    SEQ_KIND,
    SEQ_ROW,
    SEQ_T,
    SEQ_TEXT,
    SEQ_VIDEO,
    STEP,
    TOKEN,
    TOKEN_COL,
    TOKEN_IMAGE,
    TOKEN_KIND,
    TOKEN_ROW,
    TOKEN_SIZE,
    TOKEN_T,
    TOKEN_TEXT,
    TOKEN_VIDEO,
    VISION,
    vision_ranges,
)
from vlmask.spec import SweepSpec
from vlmask.viz.compare import write_compare
from vlmask.viz.heatmap import METRICS
from vlmask.viz.plot import plot_heatmap
from vlmask.viz.report import write_report

log = logging.getLogger("vlmask")


FLAGS = {
    f.name: "--" + f.metadata.get("one", f.name).replace("_", "-")
    for f in dataclasses.fields(SweepSpec)
    if f.metadata["cli"]
}
"""The ``vlmask run`` flag of each sweep option (those the command line takes)."""


_TYPES = {"int": int, "float": float}


def _add_sweep_options(run: argparse.ArgumentParser) -> None:
    """One flag per :class:`SweepSpec` field, from its metadata: help, default, choices, repeated or not."""
    for f in dataclasses.fields(SweepSpec):
        meta, flag = f.metadata, FLAGS.get(f.name)
        if flag is None:
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        shown = f" (default {default})" if default not in (None, ()) and not meta.get("choices") else ""
        kwargs = {
            "dest": f.name,
            "help": meta["help"] + shown,
            "type": _TYPES.get(str(f.type).split(" |")[0], str),
            "choices": meta.get("choices"),
        }
        if str(f.type) == "bool":  # --name / --no-name
            kwargs = {"dest": f.name, "help": kwargs["help"], "action": argparse.BooleanOptionalAction}
            kwargs["default"] = default
        elif "one" in meta:
            kwargs.update(
                action="append", default=[], help=f"{meta['help']}; repeat for several", metavar=meta["one"].upper()
            )
        else:
            kwargs.update(default=default, required=f.default is dataclasses.MISSING)
        run.add_argument(flag, **kwargs)


def _spec(args: argparse.Namespace) -> SweepSpec:
    """The run's :class:`SweepSpec`, each problem of its options told with its flag (images and videos read)."""
    values = {name: getattr(args, name) for name in FLAGS}
    for name, message in SweepSpec.problems(values, read_files=True):
        raise VlmaskError(f"{FLAGS[name]}: {message}")
    return SweepSpec(**values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmask", description="Attention knockout for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="block each chosen token in turn and measure what changes")
    run.add_argument("--model", help="hub id or checkpoint directory (default: the built-in toy model)")
    _add_sweep_options(run)
    run.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    run.add_argument("--device", default="cpu")
    run.add_argument("--attn-implementation", choices=tuple(MASK_FORMATS), default="sdpa")
    run.add_argument("--output", default="run", help="result name: writes OUTPUT_DIR/NAME.nc (default run)")
    run.add_argument("--output-dir", default="output")
    run.add_argument("--format", default="nc", help=f"comma-separated, some of {','.join(FORMATS)} (nc always)")
    run.add_argument("--overwrite", action="store_true", help="replace existing result files")
    run.add_argument("--top", type=int, default=10, help="rows in the printed ranking (default 10)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--report", action="store_true", help="also write NAME.html, the interactive report")
    run.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    heat = commands.add_parser("heatmap", help="draw a result's vision-token knockouts over its images (PNG)")
    heat.add_argument("result", help="a .nc file written by vlmask run")
    heat.add_argument("--metric", default="logprob_drop", help=f"one of {', '.join(METRICS)} (default logprob_drop)")
    heat.add_argument("--layer", help="layer for residual:/heads:/attention metrics, or final (default: the last)")
    heat.add_argument("--step", type=int, default=0, help="generation step (default 0)")
    heat.add_argument("-o", "--output", help="PNG file (default: RESULT with .png)")
    heat.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    heat.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    report = commands.add_parser("report", help="write a result's interactive HTML report (one offline file)")
    report.add_argument("result", help="a .nc file written by vlmask run")
    report.add_argument("-o", "--output", help="HTML file (default: RESULT with .html)")
    report.add_argument("--overwrite", action="store_true", help="replace an existing HTML file")
    report.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    compare = commands.add_parser("compare", help="compare two results token by token (e.g. with and without image)")
    compare.add_argument("a", help="first .nc result (A)")
    compare.add_argument("b", help="second .nc result (B)")
    compare.add_argument("-o", "--output", default="compare.html", help="HTML file (default compare.html)")
    compare.add_argument("--overwrite", action="store_true", help="replace an existing HTML file")
    compare.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    many = commands.add_parser("batch", help="run the sweeps listed in a YAML file, one result each (resumable)")
    many.add_argument("config", help="YAML file of items: name, prompt, image(s), mask, num_tokens, model, ...")
    many.add_argument("--shard", default="0/1", help="run shard i of n: the items whose index %% n == i (like 0/4)")
    many.add_argument("--output-dir", help="where NAME.nc are written (default: the file's output_dir, else output)")
    many.add_argument("--no-progress", action="store_true", help="no progress bar")
    many.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def _targets(args: argparse.Namespace) -> tuple[Path, list[str]]:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise VlmaskError(f"--format {bad[0]!r} is not known: expected some of {','.join(FORMATS)}")
    if not args.output or Path(args.output).name != args.output:
        raise VlmaskError(f"--output {args.output!r} must be a plain name; use --output-dir for the folder")
    stem = Path(args.output_dir) / args.output
    for fmt in ["nc", *formats, *(["html"] if args.report else [])]:
        _refuse_existing(stem.with_suffix(f".{fmt}"), args.overwrite, "--output")
    return stem, formats


def _print_tokens(ds: xr.Dataset) -> None:
    print(f"model input ({ds.sizes[SEQ]} tokens, chat template {ds.attrs[ATTR.chat_template]}):")
    print(f"  {'pos':>4}  {'kind':<7} {'img':>5} {'row':>3} {'col':>3}  token")
    for pos in ds[SEQ].values:
        row = ds.sel(seq=pos)
        vision = row[SEQ_KIND].item() == VISION
        image = _source(row) if vision else ""
        cell = [int(row[name]) if vision else "" for name in (SEQ_ROW, SEQ_COL)]
        print(
            f"  {pos:>4}  {row[SEQ_KIND].item()!s:<7} {image:>5} {cell[0]!s:>3} {cell[1]!s:>3}"
            f"  {row[SEQ_TEXT].item()!r}"
        )
    ranges = _vision_ranges(ds)
    if ranges:
        for source, (start, end) in ranges:
            print(f"vision tokens: positions {start}-{end - 1} ({end - start} tokens, {source})")
    else:
        print("vision tokens: none")


def _source(row: xr.Dataset) -> str:
    """``0`` for image 0, ``v0:1`` for video 0's frame group 1."""
    image = int(row[SEQ_IMAGE])
    return str(image) if image >= 0 else f"v{int(row[SEQ_VIDEO])}:{int(row[SEQ_T])}"


def _vision_ranges(ds: xr.Dataset) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for start, end in vision_ranges(ds):
        image, video, t = (int(ds[name].values[start]) for name in (SEQ_IMAGE, SEQ_VIDEO, SEQ_T))
        out.append((f"image {image}" if image >= 0 else f"video {video} frame group {t}", (start, end)))
    return out


def _label(row: xr.Dataset) -> str:
    """A masked unit as a person reads it: its text, or for vision tokens where it sits."""
    if row[TOKEN_KIND].item() != VISION:
        return repr(row[TOKEN_TEXT].item())
    video = int(row[TOKEN_VIDEO])
    media = f"video {video} t{int(row[TOKEN_T])}" if video >= 0 else f"image {int(row[TOKEN_IMAGE])}"
    size = int(row[TOKEN_SIZE])
    return f"{media} r{int(row[TOKEN_ROW])} c{int(row[TOKEN_COL])}" + (f" ({size} tokens)" if size > 1 else "")


def _print_ranking(ds: xr.Dataset, top: int) -> None:
    kl = ds[KL].mean(STEP)
    order = kl.sortby(kl, ascending=False)[TOKEN].values[:top]
    print(f"clean continuation: {ds.attrs[ATTR.clean_continuation]!r}")
    print(f"top {len(order)} of {ds.sizes[TOKEN]} masked units by KL(clean || masked), mean over steps:")
    labels = {pos: _label(ds.sel(token=pos)) for pos in order}
    width = max([16, *(len(label) for label in labels.values())])
    print(f"  {'pos':>4}  {'token':<{width}} {'kind':<7} {'KL':>9} {'logp drop':>9} {'dP %':>8}  masked continuation")
    for pos in order:
        row = ds.sel(token=pos)
        print(
            f"  {pos:>4}  {labels[pos]:<{width}} {row[TOKEN_KIND].item():<7}"
            f" {float(row[KL].mean()):>9.4f} {float(row[LOGPROB_DROP].mean()):>9.4f}"
            f" {float(row[PROB_CHANGE_PCT].mean()):>8.2f}  {row[MASKED_CONTINUATION].item()!r}"
        )


def run(args: argparse.Namespace) -> int:
    stem, formats = _targets(args)
    spec = _spec(args)
    vl = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation)
    if vl.builtin:
        card = (DEFAULT_MODEL_PATH / "README.md").read_text().splitlines()[0].lstrip("# ")
        print(f"model: built-in {DEFAULT_MODEL_PATH.name}: {card} (pass --model for a real one)")
    ds = sweep(vl, spec, progress=not args.no_progress)
    path = save_results(ds, stem.with_suffix(".nc"), overwrite=args.overwrite)
    written = [path, *write_tables(ds, stem, formats, overwrite=args.overwrite)]
    if args.report:
        written.append(write_report(ds, stem.with_suffix(".html"), overwrite=args.overwrite))
    _print_tokens(ds)
    _print_ranking(ds, args.top)
    for out in written:
        print(f"wrote {out}")
    return 0


def _refuse_existing(path: Path, overwrite: bool, flag: str = "-o") -> None:
    """Refuse an existing output before any work, naming the flags that would change that."""
    if path.exists() and not overwrite:
        raise VlmaskError(f"output '{path}' already exists: choose another {flag} or pass --overwrite")


def heatmap(args: argparse.Namespace) -> int:
    path = Path(args.output) if args.output else Path(args.result).with_suffix(".png")
    _refuse_existing(path, args.overwrite)
    ds = open_results(args.result)
    plot_heatmap(ds, path, args.metric, args.layer, args.step, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def report(args: argparse.Namespace) -> int:
    path = Path(args.output) if args.output else Path(args.result).with_suffix(".html")
    _refuse_existing(path, args.overwrite)
    write_report(open_results(args.result), path, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def compare(args: argparse.Namespace) -> int:
    _refuse_existing(Path(args.output), args.overwrite)
    a, b = open_results(args.a), open_results(args.b)
    names = (Path(args.a).stem, Path(args.b).stem)
    if names[0] == names[1]:
        names = ("A", "B")
    write_compare(a, b, args.output, names=names, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0


def batch(args: argparse.Namespace) -> int:
    """Exit status 1 if any item failed (each failure is printed with its error), else 0."""

    def show(outcome: Outcome) -> None:
        if outcome.status == "failed":
            print(f"failed  {outcome.name} (line {outcome.line}): {outcome.error}", file=sys.stderr)
        else:
            took = f" ({outcome.seconds:.1f} s)" if outcome.status == "done" else " (up to date)"
            print(f"{outcome.status:<7} {outcome.name} -> {outcome.path}{took}")

    try:
        shard = parse_shard(args.shard)
    except VlmaskError as err:
        raise VlmaskError(f"--shard: {err}") from None
    outcomes = run_batch(args.config, args.output_dir, shard=shard, progress=not args.no_progress, report=show)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    print(
        f"shard {args.shard}: {len(outcomes)} items, {counts['done']} done, {counts['skipped']} up to date,"
        f" {counts['failed']} failed"
    )
    return 1 if counts["failed"] else 0


def _with_flag(err: VlmaskError) -> str:
    """The one line of a user mistake: the library's neutral message, after the flag of the option it is about."""
    if err.option is None:
        return str(err)
    return f"{FLAGS.get(err.option, '--' + err.option.replace('_', '-'))}: {err}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmask`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    transformers.utils.logging.disable_progress_bar()
    if not args.verbose:
        transformers.utils.logging.set_verbosity_error()
    try:
        commands = {"run": run, "heatmap": heatmap, "report": report, "compare": compare, "batch": batch}
        return commands[args.command](args)
    except VlmaskError as err:
        print(f"vlmask: error: {_with_flag(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmask: interrupted; no result written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
