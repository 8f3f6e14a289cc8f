"""The `rlhf` command: one Typer verb per stage (and `eval`), each handing its arguments to its Hydra entry.

Re-dispatching into `@hydra.main` (rather than composing inside the verb) keeps all of Hydra:
`-m` sweeps, launchers such as submitit's that re-compose the config in another process,
`--cfg job`, `--info`. Before that hand-over, every job the arguments describe is composed and
checked here, so that a bad key or value is one `error:` line before anything starts.

`rlhf report` is a plain verb: it reads run directories and runs no stage, so Hydra has no part in it.

This module is the one place that turns an error into `error: ...` and an exit code.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from typer.core import TyperCommand, TyperGroup

try:
    from typer import _click as click  # recent Typer runs on its own copy of click
except ImportError:
    import click

from rlhf_cli import __version__
from rlhf_cli.errors import EXIT_WRITE_FAILED, UserError
from rlhf_cli.report.document import PageFormat
from rlhf_cli.runs import redact

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130
# EX_TEMPFAIL (sysexits.h): stopped by SIGUSR1, SIGUSR2 or SIGTERM after a checkpoint; rerun to continue.
# scripts/slurm/*.sbatch requeue the job on it.
EXIT_PREEMPTED = 75
# A write that failed for want of room or permission anywhere in a run (metrics, manifest) ends it like a
# failed checkpoint write (runs.atomic_directory): one line and EX_IOERR.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
DEBUG_ENV = "RLHF_DEBUG"
# Set by launcher.nproc for its processes: where each leaves its error line for the launcher to print once.
ERRORS_ENV = "RLHF_ERRORS_DIR"

STAGE_HELP = {
    "sft": "Supervised fine-tuning: learn the assistant turns (or completions) of a dataset.",
    "train-rm": "Reward model: a scalar score learned from pairwise or ranked preferences, started from sft/final.",
    "dpo": "Direct preference optimisation (and IPO, SLiC hinge, robust DPO, SimPO) from sft/final.",
    "ppo": "PPO against rm/final with a critic (InstructGPT step 3), from sft/final.",
    "grpo": "Group relative policy optimisation with rule, model, http or Python rewards, from sft/final.",
}
EVAL_HELP = ("Evaluate a checkpoint (sft/final unless model.path is set): accuracy, reward-model score, win rate and KL "
             "against a reference, or a reward model's accuracy on preference pairs; writes eval.json.")
# Hydra flags that take the next argument as their value.
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


class _OneLineUsageErrors(TyperGroup):
    """Click's own usage errors (an unknown command or option, a missing argument) as one `error:` line
    like every other bad input, instead of a usage block that ends in `Error:`."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # plain `rlhf`: the help, as before
            exc.show()
            code = exc.exit_code
        except click.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "rlhf"
            _die(f"{exc.format_message()} (see {command} --help)", exc.exit_code)
        except typer.Abort:
            _die("interrupted", EXIT_INTERRUPTED)
        raise SystemExit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="rlhf: the RLHF chain (SFT, reward model, PPO, DPO, GRPO) from the command line.",
    context_settings={"help_option_names": ["--help", "-h"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlhf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    pass


def _task(cfg: Any) -> None:
    """The Hydra task of every stage (module level, so submitit can pickle it by reference)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlhf_cli import distributed, preemption
    from rlhf_cli.stages import AlreadyComplete, open_run
    from rlhf_cli.stages.registry import STAGE_RUNNERS

    _setup_logging()
    log = logging.getLogger("rlhf")
    hydra_cfg = HydraConfig.get()
    with _one_line_errors():
        try:
            typed = OmegaConf.to_object(cfg)
            typed.output_dir = hydra_cfg.runtime.output_dir
            if distributed.launched_world_size() > 1 and typed.deepspeed.stage is None:
                raise UserError(f"{distributed.launched_world_size()} processes need DeepSpeed: set deepspeed=zero0|zero1|zero2|zero3")
            distributed.start(backend_needed=typed.deepspeed.stage is not None)
            if not distributed.is_main():
                log.setLevel(logging.WARNING)  # one console for the run: process 0's
            start = open_run(typed)
            with preemption.signals_recorded():
                try:
                    STAGE_RUNNERS[typed.stage](typed, start, list(hydra_cfg.overrides.task))
                except preemption.Preempted as stop:
                    start.run.preempt(stop.signal_name, stop.step, stop.checkpoint)
                    raise
                except BaseException as exc:
                    start.run.fail(_reason(exc))
                    raise
        except AlreadyComplete as done:
            log.info(str(done))
        except preemption.Preempted as stop:
            _report(str(stop))
            preemption.hand_over()  # under submitit: its handler requeues the job and exits
            raise SystemExit(EXIT_PREEMPTED)


def _eval_task(cfg: Any) -> None:
    """The Hydra task of `rlhf eval` (module level, so submitit can pickle it by reference)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlhf_cli import evaluate

    _setup_logging()
    hydra_cfg = HydraConfig.get()
    with _one_line_errors():
        typed = OmegaConf.to_object(cfg)
        typed.output_dir = hydra_cfg.runtime.output_dir
        evaluate.run(typed, list(hydra_cfg.overrides.task))


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A bad input, an interruption or an unexpected failure becomes one `error:` line and an exit code."""
    try:
        yield
    except UserError as exc:
        _die(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _die("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:  # not a bug: the disk filled up
            _die(f"{exc.filename}: {exc.strerror}", EXIT_WRITE_FAILED)
        _die(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_INTERNAL_ERROR)


def _reason(exc: BaseException) -> str:
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"


def _die(message: str, code: int) -> None:
    _report(message)
    raise SystemExit(code)


def _report(message: str) -> None:
    line = f"error: {' '.join(redact(message).split())}\n"  # a console is often a log file
    errors_dir = os.environ.get(ERRORS_ENV)
    if errors_dir:  # one of launcher.nproc's processes, which often all fail alike: the launcher prints one line
        Path(errors_dir, f"rank-{os.environ.get('RANK', '0')}").write_text(line, encoding="utf-8")
        return
    sys.stderr.write(line)
    sys.stderr.flush()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners and launchers swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging() -> None:
    import warnings

    # DeepSpeed still calls the torch.distributed collectives torch has renamed: one warning per call site.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logger = logging.getLogger("rlhf")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for noisy in ("transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def split_arguments(args: list[str]) -> tuple[list[str], list[str], Optional[str]]:
    """(Hydra flags with their values, overrides, conf= path) from a stage's extra arguments."""
    flags, overrides, conf = [], [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("conf="):
            conf = arg.split("=", 1)[1]
        elif arg in _HYDRA_VALUE_FLAGS and i + 1 < len(args):
            flags += [arg, args[i + 1]]
            i += 1
        elif arg in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in _INFO_TOPICS:
            flags += [arg, args[i + 1]]
            i += 1
        elif arg.startswith("-") and not arg.startswith("~"):
            flags.append(arg)
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides, conf


def dispatch(stage: str, args: list[str]) -> None:
    import hydra

    from rlhf_cli.config.compose import CONFIG_MODULE, check_overrides, fixed_keys, register_schemas
    from rlhf_cli.config.user_yaml import yaml_overrides

    flags, overrides, conf = split_arguments(args)
    _check_flags(stage, flags)
    modes = {"-m", "--multirun", "--cfg", "-c", "--info", "-i"}.intersection(flags)
    if len(modes) > 1:
        raise UserError(f"{' and '.join(sorted(modes))}: use one of -m/--multirun, --cfg, --info at a time")
    file_overrides = yaml_overrides(conf) if conf else []
    overrides = [o.text for o in file_overrides] + overrides
    register_schemas()
    configs = [] if "--hydra-help" in flags else check_overrides(stage, overrides, file_overrides)
    nproc = max((c.launcher.nproc for c in configs if hasattr(c, "launcher")), default=1)  # eval runs in one process
    if nproc > 1 and "WORLD_SIZE" not in os.environ and not _inspect_only(flags):
        raise SystemExit(_relaunch(stage, args, nproc))
    if any(flag in ("-m", "--multirun") for flag in flags):
        # Name each sweep job's directory after the keys the sweep varies, not every override.
        fixed = ["resume", "logger", "output_dir"] + fixed_keys(overrides)
        overrides.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]")
    sys.argv = [f"rlhf {stage}", *flags, *overrides]
    task = _eval_task if stage == "eval" else _task
    hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=stage, version_base="1.3")(task)()


def _check_flags(stage: str, flags: list[str]) -> None:
    """A flag that Hydra does not know, or a bad value of one, as an `error:` line (Hydra's parser
    would print its usage block first)."""
    import argparse

    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        _, unknown = parser.parse_known_args(flags)
    except argparse.ArgumentError as exc:
        raise UserError(f"rlhf {stage}: {exc}") from None
    if unknown:
        raise UserError(f"{unknown[0]}: not an option of rlhf {stage} (see rlhf {stage} --help)")


def _inspect_only(flags: list[str]) -> bool:
    """Flags that print something and run nothing."""
    return any(flag in ("--cfg", "-c", "--info", "-i", "--hydra-help", "--help", "-h") for flag in flags)


def _relaunch(stage: str, args: list[str], nproc: int) -> int:
    """launcher.nproc=N: the same command as N processes of one run on this node. Each sees RANK,
    WORLD_SIZE and a shared rendezvous; the first that fails stops the others and gives the exit
    code and the one `error:` line (bad data fails every process alike; a stopped peer's complaint
    says nothing new). Signals to this process (scancel, a SLURM time-limit warning) are passed on
    to all of them."""
    import signal
    import subprocess
    import tempfile
    import time

    from rlhf_cli.distributed import free_port

    errors_dir = tempfile.mkdtemp(prefix="rlhf-errors-")
    shared = {"RLHF_RUN_ID": os.environ.get("RLHF_RUN_ID", time.strftime("%Y-%m-%d_%H-%M-%S")), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), ERRORS_ENV: errors_dir}
    processes = [
        subprocess.Popen([sys.executable, "-m", "rlhf_cli", stage, *args],
                         env={**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in range(nproc)
    ]

    def forward(signum: int, _frame: Any) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        while True:
            codes = [process.poll() for process in processes]
            if any(code not in (None, 0) for code in codes):
                rank = _first_to_fail(codes, errors_dir)
                code = codes[rank] if codes[rank] is not None else _exit_code(processes[rank], codes)
                _print_error_of(rank, code, nproc, errors_dir)
                _stop_all(processes)
                return code
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    finally:
        shutil.rmtree(errors_dir, ignore_errors=True)


def _first_to_fail(codes: list[Optional[int]], errors_dir: str) -> int:
    """The process whose failure the others follow, given each one's exit code (None: running). One
    that ended without leaving its error line was killed (out of memory, say): its peers' complaints
    are about it. Otherwise, of those that have failed or left their line, the first to leave it: its
    peers' complaints of a closed connection come after it, and may end their processes before its
    own has ended."""
    reported = [_reported_at(errors_dir, rank) for rank in range(len(codes))]
    killed = [rank for rank, code in enumerate(codes) if code not in (None, 0) and reported[rank] == math.inf]
    if killed:
        return killed[0]
    failing = [rank for rank, code in enumerate(codes) if code not in (None, 0) or reported[rank] < math.inf]
    return min(failing, key=lambda rank: reported[rank])


def _reported_at(errors_dir: str, rank: int) -> float:
    """When process `rank` left its error line; never, for one that left none (killed)."""
    left = Path(errors_dir, f"rank-{rank}")
    return left.stat().st_mtime_ns if left.is_file() else math.inf


def _exit_code(process, codes: list, grace_s: float = 30.0) -> int:
    """The exit code of a process that has left its error line and is ending; if it does not end in
    time, the code of a peer that has."""
    import subprocess

    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return next(code for code in codes if code not in (None, 0))


def _print_error_of(rank: int, code: int, nproc: int, errors_dir: str) -> None:
    """The `error:` line the failed process left, or what is known when it left none (killed, or --debug)."""
    left = Path(errors_dir, f"rank-{rank}")
    line = left.read_text(encoding="utf-8") if left.is_file() else f"error: process {rank} of {nproc} ended with exit code {code}\n"
    sys.stderr.write(line)
    sys.stderr.flush()


def _stop_all(processes: list, grace_s: float = 30.0) -> None:
    """SIGTERM (a process may be saving a checkpoint for the same stop), then SIGKILL for any that a
    dead peer left waiting in a collective."""
    import subprocess

    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stage_epilog(stage: str) -> str:
    from rlhf_cli.config.compose import stage_defaults
    from rlhf_cli.config.schema import CONFIG_SCHEMAS, key_help

    defaults = stage_defaults(stage)
    rows = [(key, defaults.get(key, default), text) for key, default, text in key_help(CONFIG_SCHEMAS[stage]) if key != "stage"]
    lines = []
    for key, default, text in rows:
        lines += [f"  {key}={default}", f"      {text}"]
    # "\b" keeps click from re-wrapping the paragraph that follows it.
    return (
        "\b\nArguments: Hydra overrides (key=value, +key=value, ~key), conf=PATH.yaml (a YAML of keys,\n"
        "merged before the overrides), and Hydra flags: -m/--multirun for sweeps, --cfg job to print\n"
        "the resolved config, --info, --hydra-help.\n\n\b\nKeys, with this command's defaults:\n" + "\n".join(lines)
    )


class _StageCommand(TyperCommand):
    """A stage verb whose help ends with the table of config keys, built only when help is shown."""

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        self.epilog = _stage_epilog(self.name)
        super().format_epilog(ctx, formatter)


@contextlib.contextmanager
def _user_errors(debug: bool) -> Iterator[None]:
    """A verb's bad input as one `error:` line; with --debug (which the stages' Hydra task also reads
    from the environment, for this command only) the traceback instead."""
    before = {name: os.environ.get(name) for name in (DEBUG_ENV, "HYDRA_FULL_ERROR")}
    if debug:
        os.environ.update({name: "1" for name in before})
    try:
        yield
    except UserError as exc:
        if debug:
            raise
        _die(str(exc), exc.exit_code)
    finally:  # a process that runs more commands (tests, notebooks) gets one-line errors again
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _make_stage_command(stage: str, summary: str) -> None:
    @app.command(
        stage,
        cls=_StageCommand,
        help=summary,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def command(
        ctx: typer.Context,
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    ) -> None:
        with _user_errors(debug):
            dispatch(stage, list(ctx.args))


for _stage, _summary in STAGE_HELP.items():
    _make_stage_command(_stage, _summary)
_make_stage_command("eval", EVAL_HELP)


@app.command(
    "pipeline",
    help="Several stages chained in one run directory (runs/default/{sft,rm,dpo,grpo,ppo}): pipeline=all|rlhf|dpo|grpo, "
         "output_dir=DIR, key=value for every stage, STAGE.key=value for one (sft.train.lr=1e-4). A finished stage is "
         "skipped, an interrupted one continues, a changed one trains again.",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def pipeline_command(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    from rlhf_cli import pipeline

    _setup_logging()
    with _user_errors(debug):
        code = pipeline.run(list(ctx.args), _run_stage)
    if code:
        raise SystemExit(code)


def _run_stage(stage: str, overrides: list[str]) -> int:
    """One stage of a pipeline, as `rlhf <stage> OVERRIDES` would run it; its exit code."""
    try:
        dispatch(stage, overrides)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 0


@app.command("report", help="Plots, final metrics, accuracy after each stage and sample generations of runs, as a page.")
def report(
    run_dirs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR", show_default=False,
        help="A stage run, a directory of stage runs (runs/default) or a sweep directory; several are overlaid."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Directory to write the report into (replaced). Default: RUN_DIR/report; needed for several RUN_DIRs."),
    samples: int = typer.Option(5, "--samples", min=0, help="Greedy generations shown per model (0: none, and no model is loaded)."),
    page_format: PageFormat = typer.Option(PageFormat.html, "--format", help="index.html, or index.md for Markdown."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    from rich.console import Console

    from rlhf_cli.report.build import print_summary, write_report

    if samples:
        _setup_logging()  # sampling loads models: transformers' progress bars and warnings would bury the summary
    try:
        written = write_report(run_dirs, out, samples, page_format)
    except UserError as exc:
        if debug:
            raise
        _die(str(exc), exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        _die(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_INTERNAL_ERROR)
    print_summary(written, Console())


def main() -> None:
    # The deepspeed launcher puts --local_rank=N before the subcommand, where Typer would reject it.
    for arg in list(sys.argv[1:]):
        if arg.startswith("--local_rank"):
            sys.argv.remove(arg)
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[-1])
    app(prog_name="rlhf")


if __name__ == "__main__":
    main()
