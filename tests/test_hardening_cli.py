"""Issue 18's cases for the command line and the batch: each input, its exit status, its one line, the files left.

Every row runs ``vlmask`` (in-process through ``cli.main``, on the built-in model) and checks
the exit status, key words of the last line on stderr (the only one for our own errors), and
the files left in the output folder: none for an error. Disk cases use real filesystems: a
small tmpfs mounted for the test (as root, as CI runs), skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlmask.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
FAST = ["--no-progress", "--layers", "0"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real filesystem of ``size`` mounted at ``path`` (read-only if asked), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:  # lazily if busy: netCDF keeps the file of a failed write open until the process ends
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def run_args(out: Path | str, *extra: str, prompt: str = "what color is the circle ?") -> list[str]:
    return ["run", "--prompt", prompt, "--output-dir", str(out), *FAST, *extra]


def files(folder: Path) -> set[str]:
    """Every name in ``folder`` (hidden ones too), empty if it does not exist."""
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@dataclass
class Case:
    """One row: ``setup(tmp_path, stack)`` returns the arguments and the folder whose files are checked."""

    setup: Callable[[Path, contextlib.ExitStack], tuple[list[str], Path]]
    code: int
    words: tuple[str, ...]
    left: set[str]


def _folder_is_a_file(tmp: Path, stack) -> tuple[list[str], Path]:
    (tmp / "out").write_text("not a folder")
    return run_args(tmp / "out"), tmp


def _read_only(tmp: Path, stack) -> tuple[list[str], Path]:
    disk = stack.enter_context(tmpfs(tmp / "ro", "1m", read_only=True))
    return run_args(disk / "results"), disk


def _small_disk(size: str, *extra: str):
    def setup(tmp: Path, stack) -> tuple[list[str], Path]:
        disk = stack.enter_context(tmpfs(tmp / "disk", size))
        return run_args(disk, "--image", str(SHAPES), *extra), disk

    return setup


def _full_disk_over_an_old_file(tmp: Path, stack) -> tuple[list[str], Path]:
    disk = stack.enter_context(tmpfs(tmp / "disk", "96k"))
    (disk / "run.csv").write_text("old")
    return run_args(disk, "--image", str(SHAPES), "--format", "csv", "--overwrite"), disk


def _stale_temporary(tmp: Path, stack) -> tuple[list[str], Path]:
    (tmp / "out").mkdir()
    (tmp / "out" / ".run.nc.k2j4x8_a.tmp").touch()  # left by a kill -9 during a write
    (tmp / "out" / ".other.nc.k2j4x8_a.tmp").touch()  # another stem's: kept
    return run_args(tmp / "out"), tmp / "out"


def _simple(*extra: str, prompt: str = "what color is the circle ?"):
    def setup(tmp: Path, stack) -> tuple[list[str], Path]:
        return run_args(tmp / "out", *extra, prompt=prompt), tmp / "out"

    return setup


CASES = {
    # 4: the destination is checked before the model loads; a write failure is one line; a run's files are a set
    "output-dir-is-a-file": Case(_folder_is_a_file, 2, ("--output-dir:", "is a file, not a folder"), {"out"}),
    "read-only-filesystem": Case(_read_only, 2, ("--output-dir:", "cannot write", "Read-only file system"), set()),
    "proc": Case(lambda tmp, stack: (run_args("/proc/x"), tmp), 2, ("--output-dir:", "cannot write", "'/proc'"), set()),
    "disk-full-at-the-nc": Case(
        _small_disk("32k"), 2, ("cannot write", "run.nc", "KiB free", "no file of this run was written"), set()
    ),
    "disk-full-at-the-csv": Case(
        _small_disk("96k", "--format", "csv"),  # the .nc (~76 KB) fits, the .csv (~48 KB) not
        2,
        ("cannot write", "run.csv", "No space left on device", "no file of this run was written"),
        set(),
    ),
    "disk-full-with-overwrite": Case(
        _full_disk_over_an_old_file,
        2,
        ("cannot write", "run.csv", "no file of this run was written", "run.csv from before, untouched"),
        {"run.csv"},
    ),
    "stale-temporary-cleaned": Case(_stale_temporary, 0, (), {"run.nc", ".other.nc.k2j4x8_a.tmp"}),
    # 8: work nobody would wait for
    "prompt-longer-than-the-model": Case(
        _simple(prompt="circle " * 4100), 2, ("--prompt:", "tokens long", "at most 4096 positions"), set()
    ),
    "num-tokens-past-the-model": Case(
        _simple("--num-tokens", "10000"), 2, ("--num-tokens:", "num_tokens 10000 is too many", "at most"), set()
    ),
    # 10: smaller
    "device-tpu": Case(_simple("--device", "tpu"), 2, ("--device:", "'tpu' is not known", "cuda:N"), set()),
    "output-dotdot": Case(_simple("--output", ".."), 2, ("--output '..'", "plain file name"), set()),
    "output-hidden": Case(_simple("--output", ".run"), 2, ("--output '.run'", "not starting with '.'"), set()),
    "top-negative": Case(_simple("--top", "-1"), 2, ("--top", "-1 is below 0"), set()),
    "dtype-float64": Case(_simple("--dtype", "float64"), 2, ("--dtype", "'float64'", "float32"), set()),
    "video-fps-inf": Case(_simple("--video-fps", "inf"), 2, ("--video-fps:", "finite"), set()),
    "nul-in-prompt": Case(_simple(prompt="what\0color"), 2, ("--prompt:", "NUL character (at 4)"), set()),
}


@pytest.mark.parametrize("name", CASES)
def test_run_case(name, tmp_path, capsys):
    case = CASES[name]
    with contextlib.ExitStack() as stack:
        args, folder = case.setup(tmp_path, stack)
        by_argparse = name in ("top-negative", "dtype-float64")
        with pytest.raises(SystemExit) if by_argparse else contextlib.nullcontext() as exited:
            code = main(args)
        code = exited.value.code if by_argparse else code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == case.code, err
        if case.code:
            assert len(err) == 1, err  # argparse's mistakes too: one line, no usage block
            assert all(word in err[-1] for word in case.words), err[-1]
        assert files(folder) == case.left
        if name == "disk-full-with-overwrite":
            assert (folder / "run.csv").read_text() == "old"


def test_a_run_writes_its_files_as_a_set_and_an_interrupt_leaves_none(tmp_path, monkeypatch, capsys):
    import vlmask.viz.report as report
    from vlmask.results.io import atomic_write

    def interrupted_page(ds, path, **kwargs):
        def write(tmp):
            tmp.write_text("<html>half")
            raise KeyboardInterrupt

        return atomic_write(path, write)

    monkeypatch.setattr(report, "write_report", interrupted_page)  # an interrupt during the HTML
    assert main(run_args(tmp_path / "out", "--format", "csv,json", "--report")) == 130
    assert capsys.readouterr().err.strip() == "vlmask: interrupted; no result written"
    assert files(tmp_path / "out") == set()  # not .nc/.csv/.json, nor the folder made for them
    monkeypatch.undo()
    assert main(run_args(tmp_path / "out", "--format", "csv,json", "--report")) == 0  # the rerun is not refused
    assert files(tmp_path / "out") == {"run.nc", "run.csv", "run.json", "run.html"}


def test_ctrl_c_during_the_imports_is_one_line(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from vlmask.cli import main

        class Interrupt:  # Ctrl-C arrives while torch is being imported
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, Interrupt())
        sys.exit(main(["run", "--prompt", "hi", "--output-dir", {str(tmp_path / "out")!r}]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 130
    assert out.stderr.strip() == "vlmask: interrupted; no result written"
    assert files(tmp_path / "out") == set()


def test_the_token_table_is_capped_unless_asked_for_all(tmp_path, capsys):
    prompt = " ".join(["what color is the circle ?"] * 12)  # 60 words, over 40 rows
    assert main([*run_args(tmp_path, prompt=prompt), "--mask", "0"]) == 0
    out = capsys.readouterr().out
    more = [line for line in out.splitlines() if "more; --tokens all to see everything" in line]
    assert len(more) == 1
    rows = out.split("model input (")[1].split("vision tokens")[0].splitlines()[2:]
    assert len(rows) == 41  # 20 first, the line above, 20 last
    assert main([*run_args(tmp_path, prompt=prompt), "--mask", "0", "--tokens", "all", "--output", "b"]) == 0
    out = capsys.readouterr().out
    assert "--tokens all" not in out
    total = int(out.split("model input (")[1].split(" tokens")[0])
    assert len(out.split("model input (")[1].split("vision tokens")[0].splitlines()[2:]) == total


def test_large_work_is_announced_with_an_estimate_before_it_starts(tmp_path, caplog, monkeypatch):
    import vlmask.engine.budget as budget

    monkeypatch.setattr(budget, "LARGE_WORK", 10)
    assert main(run_args(tmp_path, "--num-tokens", "2")) == 0  # the CLI shows warnings on stderr
    said = caplog.text
    assert "large sweep: 8 knockouts x 2 steps, 51 positions to recompute; estimated" in said, said
    assert "ms per position, timed on one clean pass" in said
    caplog.clear()
    monkeypatch.setattr(budget, "LARGE_WORK", 10**9)
    assert main(run_args(tmp_path, "--output", "small")) == 0
    assert "large sweep" not in caplog.text


# --- 7: startup -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--help"], 0, "usage: vlmask"),
        (["run", "--help"], 0, "--tokens TOKENS"),
        (["rnu"], 2, "invalid choice: 'rnu'"),
        (["run", "--dtype", "float8", "--prompt", "hi"], 2, "invalid choice: 'float8'"),
    ],
)
def test_help_and_argument_errors_answer_at_once(args, code, words):
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vlmask.cli", *args], capture_output=True, text=True, check=False)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert out.returncode == code and words in out.stdout + out.stderr, out.stderr
    # about 0.6 s of CPU here (0.3 s of it numpy); importing torch alone takes several: a generous bound on
    # the CPU time, which a loaded machine does not inflate, and a looser one on the wall clock, which it does
    assert cpu < 2 and seconds < 15, f"vlmask {' '.join(args)} took {cpu:.2f} s of CPU, {seconds:.2f} s in all"


def test_parsing_the_options_imports_neither_torch_nor_xarray():
    code = (
        "import sys; from vlmask.cli import _parser; _parser().parse_args(['run', '--prompt', 'hi']);"
        " print(sorted(m for m in ('torch', 'transformers', 'nnsight', 'xarray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- 5 and 6: the batch -----------------------------------------------------------------------------------------

BOMB = "[" + ", ".join(["*l8"] * 9) + "]"
ANCHORS = "".join(
    f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else '1, 1, 1, 1, 1, 1, 1, 1, 1'}]\n" for i in range(9)
)


def _yaml(tmp: Path, text: str) -> Path:
    path = tmp / "batch.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


BATCH_CASES = {
    "python-tag": (
        "items:\n  - name: a\n    prompt: !!python/object/apply:os.system ['touch pwned']\n",
        2,
        ("batch.yaml:3:", "tag '!!python/object/apply:os.system' is not allowed"),
    ),
    "alias-bomb-in-base": (
        f"anchors:\n{ANCHORS}items:\n  - name: a\n    prompt: hi\n    base: {{type: BlockKeys, positions: {BOMB}}}\n",
        2,
        ("more than 100000 values once its aliases",),
    ),
    "alias-bomb-in-mask": (
        f"anchors:\n{ANCHORS}items:\n  - name: a\n    prompt: hi\n    mask: {BOMB}\n",
        2,
        ("more than 100000 values once its aliases",),
    ),
    "syntax-error": ("items:\n  - name: a\n    prompt: [unclosed\n", 2, ("batch.yaml:4: not valid YAML",)),
    "too-large": ("# " + "x" * 2**20 + "\n", 2, ("at most 1048576 (1 MiB) are read",)),
    "list-mask-out-of-range": (
        "items:\n  - name: a\n    prompt: what color is the circle ?\n    layers: 0\n    mask: [1, 50]\n",
        1,
        ("failed  a (line 2): mask: key position 50 is out of range",),
    ),
}


@pytest.mark.parametrize("name", BATCH_CASES)
def test_batch_case(name, tmp_path, capsys):
    text, code, words = BATCH_CASES[name]
    config = tmp_path / "batch.yaml"
    config.write_text(text)
    started = time.perf_counter()
    assert main(["batch", str(config), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == code
    assert time.perf_counter() - started < (1 if code == 2 else 60)  # refused well under a second
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert all(word in err for word in words), err
    assert "<unicode string>" not in err and "Traceback" not in err
    assert len(lines) == 1 or (code == 2 and lines[0].endswith("has 1 problem:") and len(lines) == 2), err
    assert files(tmp_path / "out") == set() and not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_list_mask_gets_the_message_of_the_same_mask_on_the_command_line(tmp_path, capsys):
    assert main(run_args(tmp_path, "--mask", "1,50")) == 2
    assert "--mask: key position 50 is out of range" in capsys.readouterr().err


def test_the_batch_replaces_only_results_it_wrote(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(run_args(out, "--output", "a")) == 0  # a vlmask run result named like the batch's item
    made = (out / "a.nc").read_bytes()
    config = _yaml(tmp_path, "items:\n  - {name: a, prompt: hi, layers: 0}\n  - {name: b, prompt: hi, layers: 0}\n")
    capsys.readouterr()
    assert main(["batch", str(config), "--output-dir", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (
        "failed  a (line 2):" in err and "was written by something else (not a batch)" in err and "--overwrite" in err
    )
    assert (out / "a.nc").read_bytes() == made and files(out) == {"a.nc", "b.nc"}
    other = tmp_path / "other"
    other.mkdir()
    theirs = _yaml(other, "items:\n  - {name: b, prompt: hello, layers: 0}\n")  # another batch, same output folder
    assert main(["batch", str(theirs), "--output-dir", str(out), "--no-progress"]) == 1
    assert f"was written by the batch {config.resolve()}" in capsys.readouterr().err
    config.write_text(config.read_text().replace("name: b, prompt: hi", "name: b, prompt: hello"))
    assert main(["batch", str(config), "--output-dir", str(out), "--no-progress", "--overwrite"]) == 0  # its own: rerun
    assert "2 done" in capsys.readouterr().out and (out / "a.nc").read_bytes() != made
