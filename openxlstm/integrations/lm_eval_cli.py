"""``openxlstm eval --tasks T1,T2``: EleutherAI's lm-evaluation-harness on an openxlstm model
(``openxlstm.integrations.lm_eval``), with lm-eval's own option names (``--include_path`` and the like are
accepted as well as ``--include-path``).

``add_harness_arguments`` adds the options to the ``eval`` parser (which already has ``--model`` /
``--checkpoint``, ``--dtype`` and ``--device``); ``run_harness`` runs them. lm-eval is imported only here, so
the package and the rest of the command work without it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..options import arg_type, int_range

INSTALL = "pip install 'openxlstm[eval]'"


def _count(lo: int):
    return arg_type(int_range(lo), int)


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction in (0, 1), "
                                         f"got {text!r}") from None
    if not 0 < value < float("inf") or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a number of examples (>= 1) or a fraction in (0, 1), got {text!r}")
    return value


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness options of ``openxlstm eval``: ``--tasks`` selects the harness instead of the
    context-length evaluation."""
    g = parser.add_argument_group("lm-evaluation-harness (with --tasks; needs " + INSTALL + ")")
    g.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="comma-separated lm-eval task names or globs (e.g. lambada_openai,hellaswag,piqa); runs the "
                        "harness instead of the context-length table (default: none)")
    g.add_argument("--include-path", "--include_path", dest="include_path", default=None, metavar="DIR",
                   help="a folder of your own task YAML files (default: lm-eval's tasks only)")
    g.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=_count(0), default=None, metavar="N",
                   help="examples in each prompt (default: each task's own)")
    g.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help="evaluate only the first N examples of each task, or a fraction of them if below 1 "
                        "(for quick checks; default: all)")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_count(1), default=1, metavar="N",
                   help="rows per forward pass (several short requests are packed into a row) and prompts per "
                        "generation batch")
    g.add_argument("--output-path", "--output_path", dest="output_path", default=None, metavar="F",
                   help="write the results as JSON to the file F (default: print the table only)")
    g.add_argument("--log-samples", "--log_samples", dest="log_samples", action="store_true",
                   help="with --output-path, also write every request and the model's answers (default: off)")
    g.add_argument("--model-args", "--model_args", dest="model_args", default=None, metavar="K=V,...",
                   help="more arguments of the openxlstm lm-eval model, e.g. max_length=4096,max_gen_toks=128,"
                        "mlstm_backend=chunkwise (default: none)")
    g.add_argument("--gen-kwargs", "--gen_kwargs", dest="gen_kwargs", default=None, metavar="K=V,...",
                   help="generation arguments for generate_until tasks, e.g. do_sample=true,temperature=0.7 "
                        "(default: each task's own)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output-path (default: refuse)")


def _import_harness():
    """(lm_eval, OpenXLSTMLM, TaskManager, make_table, lm_eval.utils), or a UserError naming what to install."""
    try:
        import lm_eval
        from lm_eval import utils as lm_utils
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("lm_eval", "datasets", "evaluate"):
            raise
        raise UserError(f"--tasks runs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    from .lm_eval import OpenXLSTMLM

    return lm_eval, OpenXLSTMLM, TaskManager, lm_utils.make_table, lm_utils


def _task_manager(TaskManager, names: list[str], include_path: Optional[str]):
    """lm-eval's task index: the --include-path folder alone when it holds every requested task (lm-eval's
    14,000 built-in task files take seconds to index), else the built-in tasks and the folder."""
    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.is_dir():
            raise UserError(f"--include-path {include_path!r} is not a folder (a folder of task YAML files)")
        own = TaskManager(include_path=str(path), include_defaults=False)
        if not _missing(own, names):
            return own
    manager = TaskManager(include_path=None if include_path is None else str(Path(include_path).expanduser()))
    missing = _missing(manager, names)
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = "lm-eval's tasks" + ("" if include_path is None else f" or {include_path!r}")
        raise UserError(f"--tasks: unknown task {missing[0]!r}{hint}: not in {where}; lm-eval ls tasks lists them, "
                        f"--include-path DIR adds your own YAML tasks")
    return manager


def _missing(manager, names: list[str]) -> list[str]:
    return [n for n in names if not manager.match_tasks([n])]


def _output_file(args) -> Optional[Path]:
    if args.output_path is None:
        if args.log_samples:
            raise UserError("--log-samples writes into the --output-path file: give --output-path F")
        return None
    out = Path(args.output_path).expanduser()
    if out.is_dir():
        raise UserError(f"--output-path {args.output_path!r} is a folder; name the JSON file to write")
    if out.exists() and not args.overwrite:
        raise UserError(f"--output-path {args.output_path!r} exists; add --overwrite to replace it, or choose "
                        f"another name")
    if not out.parent.is_dir():
        raise UserError(f"--output-path {args.output_path!r}: the folder {str(out.parent)!r} does not exist")
    return out


def _write_json_atomic(path: Path, data: dict, default) -> None:
    """``data`` as JSON into ``path`` through a temporary file in the same folder and ``os.replace`` (a reader
    sees the old file or the new one, never a part); the file gets the umask's permissions."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=default, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write --output-path {str(path)!r}: {e.strerror or e}") from None


def _model_kwargs(text: Optional[str], parse, OpenXLSTMLM) -> dict:
    import inspect

    kwargs = parse(text) if text else {}
    fixed = {"pretrained", "dtype", "device", "batch_size"}
    allowed = [k for k in inspect.signature(OpenXLSTMLM).parameters if k not in fixed]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        reason = ("set by --model/--checkpoint, --dtype, --device and --batch-size" if set(unknown) & fixed
                  else f"allowed: {', '.join(allowed)}")
        raise UserError(f"--model-args: {', '.join(unknown)} not accepted ({reason})")
    return kwargs


def run_harness(args) -> int:
    """Run ``args.tasks`` through lm-eval on the model of ``args.model`` / ``args.checkpoint``; print lm-eval's
    table (and write ``--output-path``). Returns the exit status (0)."""
    names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks {args.tasks!r}: name at least one task, e.g. --tasks lambada_openai,hellaswag")
    out = _output_file(args)
    lm_eval, OpenXLSTMLM, TaskManager, make_table, lm_utils = _import_harness()
    extra = _model_kwargs(args.model_args, lm_utils.simple_parse_args_string, OpenXLSTMLM)
    gen_kwargs = lm_utils.simple_parse_args_string(args.gen_kwargs) if args.gen_kwargs else None
    manager = _task_manager(TaskManager, names, args.include_path)
    path = args.checkpoint if getattr(args, "checkpoint", None) is not None else args.model
    if getattr(args, "checkpoint", None) is not None and not Path(path).expanduser().exists():
        raise UserError(f"checkpoint {path!r} does not exist")
    lm = OpenXLSTMLM(pretrained=path, dtype=getattr(args, "dtype", "auto"), device=getattr(args, "device", None),
                     batch_size=args.batch_size, **extra)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
                                          task_manager=manager, log_samples=args.log_samples, gen_kwargs=gen_kwargs)
    except (ConnectionError, FileNotFoundError) as e:  # a task's data set: not downloadable, or a missing file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--tasks: cannot load a task's data: {first} (lm-eval downloads a task's data set "
                        f"from the Hugging Face Hub on first use; HF_DATASETS_OFFLINE=1 reads only what is "
                        f"cached)") from None
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if out is not None:
        if not args.log_samples:
            results.pop("samples", None)
        _write_json_atomic(out, results, lm_utils.handle_non_serializable)
        print(f"results written to {out}", file=sys.stderr)
    return 0


__all__ = ["add_harness_arguments", "run_harness"]
