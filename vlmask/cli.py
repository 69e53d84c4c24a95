"""The ``vlmask`` command line: ``vlmask run``, ``heatmap``, ``report``, ``compare``, ``batch`` and ``summary``.

User mistakes end in one line on stderr and exit status 2, with no output file left.
Parsing the options imports neither torch nor xarray: ``--help`` and a mistyped option answer at
once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from vlmask.errors import VlmaskError
from vlmask.model.names import DEVICE_MAPS, DTYPE_NAMES, MASK_FORMATS, check_device
from vlmask.results.io import FORMATS, check_destination, output_set
from vlmask.spec import SweepSpec

if TYPE_CHECKING:
    import xarray as xr

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


TOKEN_ROWS = 40
"""Rows of the token table ``vlmask run`` prints by default: the first and last half of them."""


def _count(least: int):
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}: give {least} or more")
        return value

    return parse


def _rows(text: str) -> int | None:
    """``--tokens``: how many rows of the token table to print, or ``all`` (None)."""
    return None if text == "all" else _count(0)(text)


def _add_batch(commands: Any) -> None:
    """The ``vlmask batch`` subcommand and its options."""
    many = commands.add_parser("batch", help="run the sweeps listed in a YAML file, one result each (resumable)")
    many.add_argument("config", help="YAML file of items: name, prompt, image(s), mask, num_tokens, model, ...")
    many.add_argument(
        "--shard",
        default="0/1",
        help="run shard i of n: the items whose index %% n == i (like 0/4); auto: this Slurm array task's",
    )
    many.add_argument("--scheduler", help="run the items on the Dask cluster at this address (tcp://host:8786)")
    many.add_argument("--workers", type=int, help="run the items on a local Dask cluster of this many processes")
    many.add_argument("--output-dir", help="where NAME.nc are written (default: the file's output_dir, else output)")
    many.add_argument("--overwrite", action="store_true", help="also replace NAME.nc files this batch did not write")
    many.add_argument("--no-progress", action="store_true", help="no progress bar")
    many.add_argument("-v", "--verbose", action="store_true", help="log what happens")


def _add_summary(commands: Any) -> None:
    """The ``vlmask summary`` subcommand and its options."""
    summary = commands.add_parser("summary", help="mean effects over many results, with bootstrap intervals")
    summary.add_argument("results", nargs="+", help="result files, result directories or batch YAML files")
    summary.add_argument(
        "--by", default="unit", help="comma-separated: unit, unit-kind, window, layer, intervention (default unit)"
    )
    summary.add_argument("--step", type=_count(0), default=0, help="generation step (default 0)")
    summary.add_argument("--resamples", type=_count(1), default=1000, help="bootstrap resamples (default 1000)")
    summary.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    summary.add_argument("-o", "--output", default="summary.nc", help="netCDF file (default summary.nc)")
    summary.add_argument("--png", help="also draw the first --by grouping's effect, a line per other cell (PNG)")
    summary.add_argument("--metric", default="kl", help="the metric the PNG draws (default kl)")
    summary.add_argument("--overwrite", action="store_true", help="replace existing output files")
    summary.add_argument("-v", "--verbose", action="store_true", help="log what happens")


class _Parser(argparse.ArgumentParser):
    """argparse, whose mistakes end in one line (like vlmask's own), pointing at ``--help`` instead of the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vlmask", description="Attention knockout for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="block each chosen token in turn and measure what changes")
    run.add_argument("--model", help="hub id, checkpoint directory or .gguf file (default: the built-in toy model)")
    _add_sweep_options(run)
    run.add_argument("--dtype", choices=DTYPE_NAMES, help="default float32 on CPU, bfloat16 on CUDA")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    run.add_argument("--attn-implementation", choices=tuple(MASK_FORMATS), default="sdpa")
    run.add_argument(
        "--device-map",
        help=f"spread a large model over devices: {'|'.join(DEVICE_MAPS)} or a JSON file of module -> device "
        "(cpu, disk, cuda:N); instead of --device",
    )
    run.add_argument("--max-memory-per-device", help="with --device-map: caps like 0=20GiB,1=20GiB,cpu=60GiB")
    run.add_argument("--offload-folder", help="with --device-map: where disk-offloaded weights go (default: temp)")
    run.add_argument("--output", default="run", help="result name: writes OUTPUT_DIR/NAME.nc (default run)")
    run.add_argument("--output-dir", default="output")
    run.add_argument("--format", default="nc", help=f"comma-separated, some of {','.join(FORMATS)} (nc always)")
    run.add_argument("--overwrite", action="store_true", help="replace existing result files")
    run.add_argument("--top", type=_count(0), default=10, help="rows in the printed ranking (default 10)")
    rows = f"rows of the printed token table, or all (default {TOKEN_ROWS}: the first and last half)"
    run.add_argument("--tokens", type=_rows, default=TOKEN_ROWS, help=rows)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--report", action="store_true", help="also write NAME.html, the interactive report")
    run.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    heat = commands.add_parser("heatmap", help="draw a result's vision-token knockouts over its images (PNG)")
    heat.add_argument("result", help="a .nc file written by vlmask run")
    heat.add_argument(
        "--metric", default="logprob_drop", help="what to draw (default logprob_drop; an unknown one lists them all)"
    )
    heat.add_argument("--layer", help="layer for residual:/heads:/attention metrics, or final (default: the last)")
    heat.add_argument("--step", type=_count(0), default=0, help="generation step (default 0)")
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
    _add_batch(commands)
    _add_summary(commands)
    return parser


def _check_output(paths: list[Path], overwrite: bool, flag: str, folder_flag: str | None = None) -> None:
    """Refuse, before any work, outputs that exist (naming the flags that would change that) or cannot be written."""
    for path in paths:
        if path.exists() and not overwrite:
            raise VlmaskError(f"output '{path}' already exists: choose another {flag} or pass --overwrite")
    try:
        check_destination(paths, overwrite=True)
    except VlmaskError as err:
        raise VlmaskError(f"{folder_flag or flag}: {err}") from None


def _targets(args: argparse.Namespace) -> tuple[Path, list[str]]:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise VlmaskError(f"--format {bad[0]!r} is not known: expected some of {','.join(FORMATS)}")
    name = args.output
    if not name or Path(name).name != name or name.startswith(".") or "\0" in name:
        raise VlmaskError(
            f"--output {name!r} must be a plain file name, not starting with '.'; use --output-dir for the folder"
        )
    if "\0" in args.output_dir:
        raise VlmaskError(f"--output-dir {args.output_dir!r} holds a NUL character: no folder is named so")
    stem = Path(args.output_dir) / name
    suffixes = dict.fromkeys(["nc", *formats, *(["html"] if args.report else [])])
    _check_output([stem.with_suffix(f".{fmt}") for fmt in suffixes], args.overwrite, "--output", "--output-dir")
    return stem, formats


def _print_tokens(ds: xr.Dataset, rows: int | None) -> None:
    from vlmask.results.schema import ATTR, SEQ, SEQ_COL, SEQ_KIND, SEQ_ROW, SEQ_TEXT, VISION

    print(f"model input ({ds.sizes[SEQ]} tokens, chat template {ds.attrs[ATTR.chat_template]}):")
    print(f"  {'pos':>4}  {'kind':<7} {'img':>5} {'row':>3} {'col':>3}  token")
    positions = ds[SEQ].values.tolist()
    hidden = 0 if rows is None else max(0, len(positions) - rows)
    for i, pos in enumerate(positions):
        if hidden and rows // 2 <= i < rows // 2 + hidden:
            if i == rows // 2:
                print(f"  ... {hidden} more; --tokens all to see everything")
            continue
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
    """``0`` for image 0 (``0:2`` for its LLaVA-NeXT tile 2), ``v0:1`` for video 0's frame group 1."""
    from vlmask.results.schema import SEQ_IMAGE, SEQ_T, SEQ_VIDEO

    image, t = int(row[SEQ_IMAGE]), int(row[SEQ_T])
    if image >= 0:
        return f"{image}:{t}" if t > 0 else str(image)
    return f"v{int(row[SEQ_VIDEO])}:{t}"


def _vision_ranges(ds: xr.Dataset) -> list[tuple[str, tuple[int, int]]]:
    from vlmask.results.schema import SEQ_IMAGE, SEQ_T, SEQ_VIDEO, vision_ranges

    out = []
    for start, end in vision_ranges(ds):
        image, video, t = (int(ds[name].values[start]) for name in (SEQ_IMAGE, SEQ_VIDEO, SEQ_T))
        out.append((f"image {image}" if image >= 0 else f"video {video} frame group {t}", (start, end)))
    return out


def _label(row: xr.Dataset) -> str:
    """A masked unit as a person reads it: its text, or for vision tokens where it sits."""
    from vlmask.results.schema import (
        TOKEN_COL,
        TOKEN_IMAGE,
        TOKEN_KIND,
        TOKEN_ROW,
        TOKEN_SIZE,
        TOKEN_T,
        TOKEN_TEXT,
        TOKEN_VIDEO,
        VISION,
    )

    if row[TOKEN_KIND].item() != VISION:
        return repr(row[TOKEN_TEXT].item())
    video = int(row[TOKEN_VIDEO])
    media = f"video {video} t{int(row[TOKEN_T])}" if video >= 0 else f"image {int(row[TOKEN_IMAGE])}"
    if video < 0 and int(row[TOKEN_T]) > 0:  # a LLaVA-NeXT tile (panel 0 is the base image)
        media += f" tile {int(row[TOKEN_T])}"
    size = int(row[TOKEN_SIZE])
    return f"{media} r{int(row[TOKEN_ROW])} c{int(row[TOKEN_COL])}" + (f" ({size} tokens)" if size > 1 else "")


def _print_ranking(ds: xr.Dataset, top: int) -> None:
    from vlmask.results.schema import (
        ATTR,
        KL,
        LOGPROB_DROP,
        MASKED_CONTINUATION,
        PROB_CHANGE_PCT,
        STEP,
        TOKEN,
        TOKEN_KIND,
    )

    kl = ds[KL].mean(STEP)
    order = kl.sortby(kl, ascending=False)[TOKEN].values[:top]
    forced = " (the answer's tokens, then greedy)" if ds.attrs.get(ATTR.measured_token) == "answer" else ""
    print(f"clean continuation{forced}: {ds.attrs[ATTR.clean_continuation]!r}")
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


def _quiet_transformers(verbose: bool) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not verbose:
        transformers.utils.logging.set_verbosity_error()


def _write_run(ds: xr.Dataset, stem: Path, formats: list[str], args: argparse.Namespace) -> list[Path]:
    """The run's files as one set: every one of them lands, or (on a failure or an interrupt) none."""
    from vlmask.results.io import save_results, write_tables
    from vlmask.viz.report import write_report

    targets = [stem.with_suffix(f".{fmt}") for fmt in dict.fromkeys(["nc", *formats, *(["html"] * args.report)])]
    try:
        with output_set() as landed:
            save_results(ds, stem.with_suffix(".nc"), overwrite=args.overwrite)
            write_tables(ds, stem, formats, overwrite=args.overwrite)
            if args.report:
                write_report(ds, stem.with_suffix(".html"), overwrite=args.overwrite)
    except VlmaskError as err:
        before = [str(p) for p in targets if p.exists()]
        there = f"; {', '.join(before)} from before, untouched" if before else ""
        raise VlmaskError(f"{err}; no file of this run was written{there}") from None
    return landed


def run(args: argparse.Namespace) -> int:
    stem, formats = _targets(args)
    spec = _spec(args)
    check_device(args.device)
    _quiet_transformers(args.verbose)
    from vlmask.builtin import DEFAULT_MODEL_PATH
    from vlmask.engine.sweep import sweep
    from vlmask.model.load import load_model

    vl = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        device_map=args.device_map,
        max_memory=args.max_memory_per_device,
        offload_folder=args.offload_folder,
    )
    if vl.builtin:
        card = (DEFAULT_MODEL_PATH / "README.md").read_text().splitlines()[0].lstrip("# ")
        print(f"model: built-in {DEFAULT_MODEL_PATH.name}: {card} (pass --model for a real one)")
    ds = sweep(vl, spec, progress=not args.no_progress)
    _print_tokens(ds, args.tokens)
    _print_ranking(ds, args.top)
    written = _write_run(ds, stem, formats, args)
    try:
        for out in written:
            print(f"wrote {out}")
    except KeyboardInterrupt:
        print(f"vlmask: interrupted; written: {', '.join(map(str, written))}", file=sys.stderr)
        return 130
    return 0


def heatmap(args: argparse.Namespace) -> int:
    path = Path(args.output) if args.output else Path(args.result).with_suffix(".png")
    _check_output([path], args.overwrite, "-o")
    from vlmask.results.io import open_results
    from vlmask.viz.plot import plot_heatmap

    ds = open_results(args.result)
    plot_heatmap(ds, path, args.metric, args.layer, args.step, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def report(args: argparse.Namespace) -> int:
    path = Path(args.output) if args.output else Path(args.result).with_suffix(".html")
    _check_output([path], args.overwrite, "-o")
    from vlmask.results.io import open_results
    from vlmask.viz.report import write_report

    write_report(open_results(args.result), path, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def compare(args: argparse.Namespace) -> int:
    _check_output([Path(args.output)], args.overwrite, "-o")
    from vlmask.results.io import open_results
    from vlmask.viz.compare import write_compare

    a, b = open_results(args.a), open_results(args.b)
    names = (Path(args.a).stem, Path(args.b).stem)
    if names[0] == names[1]:
        names = ("A", "B")
    write_compare(a, b, args.output, names=names, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0


def batch(args: argparse.Namespace) -> int:
    """Exit status 1 if any item failed (each failure is printed with its error), else 0."""
    from vlmask.batch.run import Outcome, parse_shard, run_batch

    def show(outcome: Outcome) -> None:
        if outcome.status == "failed":
            where = f"{outcome.file}:{outcome.line}" if outcome.file else f"line {outcome.line}"
            print(f"failed  {outcome.name} ({where}): {outcome.error}", file=sys.stderr)
        else:
            took = f" ({outcome.seconds:.1f} s)" if outcome.status == "done" else " (up to date)"
            print(f"{outcome.status:<7} {outcome.name} -> {outcome.path}{took}")

    try:
        shard = parse_shard(args.shard)
    except VlmaskError as err:
        raise VlmaskError(f"--shard: {err}") from None
    _quiet_transformers(args.verbose)
    common = dict(shard=shard, progress=not args.no_progress, report=show, overwrite=args.overwrite)
    if args.scheduler is not None or args.workers is not None:
        from vlmask.batch.cluster import run_batch_on_cluster

        cluster = dict(scheduler=args.scheduler, workers=args.workers)
        outcomes = run_batch_on_cluster(args.config, args.output_dir, **cluster, **common)
    else:
        outcomes = run_batch(args.config, args.output_dir, **common)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    print(
        f"shard {args.shard}: {len(outcomes)} items, {counts['done']} done, {counts['skipped']} up to date,"
        f" {counts['failed']} failed"
    )
    return 1 if counts["failed"] else 0


def summary(args: argparse.Namespace) -> int:
    out = Path(args.output)
    _check_output([out, *([Path(args.png)] if args.png else [])], args.overwrite, "-o")
    from vlmask.batch.summary import summarize
    from vlmask.results.io import atomic_write
    from vlmask.viz.summary_plot import plot_summary, summary_figure

    result = summarize(args.results, args.by, step=args.step, resamples=args.resamples, seed=args.seed)
    if args.png:
        summary_figure(result, args.metric)  # a bad --metric fails before any file is written
    atomic_write(out, lambda tmp: result.to_netcdf(tmp, engine="netcdf4"))
    print(f"wrote {out} ({result.attrs['results']} results, by {result.attrs['by']})")
    if args.png:
        print(f"wrote {plot_summary(result, args.png, args.metric, overwrite=args.overwrite)}")
    return 0


def _with_flag(err: VlmaskError) -> str:
    """The one line of a user mistake: the library's neutral message, after the flag of the option it is about."""
    if err.option is None:
        return str(err)
    return f"{FLAGS.get(err.option, '--' + err.option.replace('_', '-'))}: {err}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmask`` command."""
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
        commands = {
            "run": run,
            "heatmap": heatmap,
            "report": report,
            "compare": compare,
            "batch": batch,
            "summary": summary,
        }
        return commands[args.command](args)
    except VlmaskError as err:
        print(f"vlmask: error: {_with_flag(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmask: interrupted; no result written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
