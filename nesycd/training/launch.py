"""Command-line entry point for one LoRA job, runnable alone or under `accelerate launch`.

Run it on one process:

    python -m nesycd.training.launch --base MODEL_DIR --rows rows.jsonl --out DIR --epochs 2

or on several processes with DDP:

    accelerate launch --multi_gpu --num_processes 2 -m nesycd.training.launch --base MODEL_DIR --rows rows.jsonl --out DIR

`--multi_gpu` selects accelerate's torchrun launcher. On a machine without GPUs the processes
then train on the CPU in a gloo process group. accelerate 1.16 starts a single process for
`--cpu --num_processes 2` unless it is given an mpirun host file (`--mpirun_hostfile`).

`rows.jsonl` contains one JSON object per line with `prompt`, `completion` and `view`, the rows that
`nesycd.training.sft.train_lora` takes. Every process writes `DIR/launch_rank<RANK>.json` with
its rank, the world size of the process group it trained in, its loss curve and the adapter's
sha256, so a multi-process run can be checked afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

from nesycd.errors import NesycdError, TrainingError
from nesycd.training.sft import LoraTrainingConfig, train_lora

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, train, write this process's launch record and return the exit code."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        rows = read_rows(args.rows)
        config = config_from_args(args)
        view_weights = parse_view_weights(args.view_weight)
        result = train_lora(args.base, rows, args.out, config=config, view_weights=view_weights)
    except NesycdError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    record = {
        **process_group_info(),
        "rank_env": rank,
        "adapter_dir": str(result.adapter_dir),
        "adapter_sha256": result.adapter_sha256,
        "n_rows": result.n_rows,
        "rows_by_view": result.rows_by_view,
        "loss_curve": result.loss_curve,
        "train_seconds": result.train_seconds,
        "config": dataclasses.asdict(config),
    }
    record_path = Path(args.out) / f"launch_rank{rank}.json"
    record_path.write_text(json.dumps(record, indent=1))
    logger.info("Wrote %s (world size %d)", record_path, record["world_size"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the parser: the job's paths, then one option per `LoraTrainingConfig` field."""
    parser = argparse.ArgumentParser(
        prog="python -m nesycd.training.launch",
        description="Train one LoRA adapter on prompt/completion rows, alone or under `accelerate launch`.",
    )
    parser.add_argument("--base", required=True, help="Base model folder (written by save_pretrained) or hub id.")
    parser.add_argument("--rows", required=True, type=Path, help="JSONL file of rows with prompt, completion and view.")
    parser.add_argument("--out", required=True, type=Path, help="Output folder. The adapter is written to OUT/adapter.")
    parser.add_argument(
        "--view-weight",
        action="append",
        default=[],
        metavar="VIEW=WEIGHT",
        help="Loss weight of one view, for example kb_cot=0.5. Repeat the option for each view (default 1.0 each).",
    )
    helps = _field_help(LoraTrainingConfig)
    for field in dataclasses.fields(LoraTrainingConfig):
        option = "--" + field.name.replace("_", "-")
        help_text = f"{helps.get(field.name, field.name)} (default: {field.default})"
        kind, optional = _field_kind(field)
        if kind is bool and optional:
            # "auto" means None, which lets train_lora decide.
            default = {None: "auto", True: "true", False: "false"}[field.default]
            help_text = f"{helps.get(field.name, field.name)} auto means None. (default: {default})"
            parser.add_argument(option, choices=["auto", "true", "false"], default=default, help=help_text)
        elif kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            parser.add_argument(
                option, type=_optional(kind) if optional else kind, default=field.default, help=help_text
            )
    return parser


def config_from_args(args: argparse.Namespace) -> LoraTrainingConfig:
    values = {}
    for field in dataclasses.fields(LoraTrainingConfig):
        value = getattr(args, field.name)
        kind, optional = _field_kind(field)
        if kind is bool and optional:
            value = {"auto": None, "true": True, "false": False}[value]
        values[field.name] = value
    return LoraTrainingConfig(**values)


def read_rows(path: Path) -> list[dict]:
    """Read prompt/completion rows from a JSONL file, skipping blank lines."""
    if not path.is_file():
        raise TrainingError(f"Rows file {path} not found. Pass a JSONL file with prompt, completion and view per line.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingError(f"Line {number} of {path} is not valid JSON: {error}") from error
        if not isinstance(row, dict):
            raise TrainingError(f"Line {number} of {path} is not a JSON object: {line[:200]}")
        rows.append(row)
    return rows


def parse_view_weights(pairs: list[str]) -> dict[str, float]:
    weights = {}
    for pair in pairs:
        view, separator, value = pair.partition("=")
        view = view.strip()
        if not separator or not view:
            raise TrainingError(f"Invalid --view-weight {pair!r}. Write VIEW=WEIGHT, for example cot=0.7.")
        try:
            weights[view] = float(value)
        except ValueError as error:
            raise TrainingError(f"Invalid weight in --view-weight {pair!r}: {value!r} is not a number.") from error
    return weights


def process_group_info() -> dict:
    """Return the rank, world size and backend of the torch.distributed process group, if one is set up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": str(dist.get_backend())}
    return {"rank": 0, "world_size": 1, "backend": None}


def _field_kind(field: dataclasses.Field) -> tuple[type, bool]:
    """Return the value type of a config field and whether it also accepts None."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    names = [name.strip() for name in annotation.split("|")]
    optional = "None" in names
    kinds = {"bool": bool, "int": int, "float": float, "str": str}
    kind = next((kinds[name] for name in names if name in kinds), str)
    return kind, optional


def _optional(kind: type):
    """Return an argparse converter that reads "none" as None and anything else as `kind`."""

    def convert(text: str):
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = kind.__name__
    return convert


def _field_help(config_class) -> dict[str, str]:
    """Return the help of each field from the `Args:` section of the class docstring."""
    helps: dict[str, str] = {}
    current = None
    in_args = False
    for line in (config_class.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args or not stripped:
            continue
        match = re.match(r"(\w+): (.*)", stripped)
        if match and match.group(1) in {field.name for field in dataclasses.fields(config_class)}:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current is not None:
            helps[current] += " " + stripped
    return helps


if __name__ == "__main__":
    sys.exit(main())
