"""``lsgs study scoring``: re-score a finished run over a grid of scoring options, without retraining.

    lsgs study scoring --run_dir RUN --grid '{"map_reference": ["reconstruction", "input"],
                                              "reconstruction_weight": [0, 1], "nll_quantile": [0.9, 0.99]}'

Every row of the cartesian grid is one ``trainer.test`` of ``ScoringModule`` built from the run's own scoring
config (``RUN/scoring/config.yaml``: the run's VQ-VAE and transformer checkpoints, data and harness settings) with
the row's options on top, so a row is exactly what the scoring stage would give with those options. What no option
changes is computed once and shared by all rows through a ``ScoringCache``: the codes, the transformer logits and
``X_hat`` of every validation and test batch; the decoded restorations are shared by the rows that resample the
same way (same NLL thresholds, n, temperature, seed; rows run grouped so). Maps, thresholds and metrics are
recomputed per row.

Outputs: ``RUN/studies/<name>.{md,csv}`` (default name ``scoring``): one row per setting with pixel AUROC, pixel AP,
Dice (best and validation threshold), AUPRO (when the run computes it) and image AUROC, and the run's LSGS row and
its other methods (those of kind baseline are the floors) beside them, each study row with the command that
reproduces it alone (run from the run folder: ``lsgs test -c scoring/config.yaml ...
--model.init_args.<option>=<value>``, results in
``RUN/studies/repro/<row id>/``; it never touches the run's own outputs).

A run folder may have moved since it was trained (its paths are stored relative to it); when its data moved too,
``--data.root`` names the data's new folder.

Resumable: each finished row is written atomically to ``RUN/studies/<name>/rows/<row id>.json``; a re-run skips
the rows already there (for the same scoring stage of the run) and a killed study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lsgs.errors import ConfigError
from lsgs.io import atomic_write_json, atomic_write_text, read_json, read_json_or_none
from lsgs.layout import RunLayout, read_stage_config
from lsgs.methods.registry import ABLATION_KIND, LSGS_METHOD, evaluated_methods
from lsgs.modules.scoring import RESTORATION_OPTIONS, ScoringCache, ScoringModule
from lsgs.options import Check, show, signature_defaults
from lsgs.progress import progress
from lsgs.reports.tables import METRIC_COLUMNS, csv_text, format_value, markdown_table

# Grid keys: the options ScoringModule declares (its own and the harness's), each with the check its constructor
# runs; the defaults a row leaves unset are the constructor's.
GRID_OPTIONS: dict[str, Check] = ScoringModule.option_checks
SCORING_DEFAULTS = signature_defaults(ScoringModule)


def parse_grid(text: str) -> dict[str, list[Any]]:
    """``--grid`` JSON -> ``{option: [values]}``; any bad key or value is one ``ConfigError`` line."""
    try:
        grid = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--grid is not valid JSON ({error}): {text!r}") from None
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"--grid must be a non-empty JSON object {{option: [values]}}, got {text!r}")
    for key, values in grid.items():
        if key not in GRID_OPTIONS:
            raise ConfigError(f"--grid: unknown scoring option {key!r}; valid: {', '.join(GRID_OPTIONS)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--grid: {key} must be a non-empty list of values, got {values!r}")
        for value in values:
            problem = GRID_OPTIONS[key].problem(value)
            if problem:
                raise ConfigError(f"--grid: {key}={show(value)} {problem}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"--grid: {key} lists a value twice: {values!r}")
    return grid


def grid_rows(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product, in the order of the keys and values given."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def row_id(settings: dict[str, Any]) -> str:
    """A short stable id of a setting (independent of the key order)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _load_run(run_dir: Path, data_root: str | None = None) -> tuple[dict[str, Any], str]:
    """The run's scoring-stage config (LightningCLI dict, its data at ``data_root`` when given) and its stage hash;
    errors if it is not finished, has no labelled test set, or its data is not where the config says."""
    scoring = RunLayout.of(run_dir).scoring
    done, config_path = scoring.done, scoring.config
    if not run_dir.is_dir():
        raise ConfigError(f"--run_dir '{run_dir}' does not exist")
    if not done.is_file() or not config_path.is_file():
        raise ConfigError(
            f"--run_dir '{run_dir}' has no finished scoring stage ({done} missing); run `lsgs pipeline` first"
        )
    config = read_stage_config(config_path)
    if "ScoringModule" not in str(config.get("model", {}).get("class_path", "")):
        raise ConfigError(f"{config_path}: the scoring stage is not a ScoringModule")
    if read_json(scoring.results_json, "scoring results").get("has_test_set") is False:
        raise ConfigError(f"--run_dir '{run_dir}': its data has no labelled test set, so there are no metrics to "
                          "compare scoring options on")  # fmt: skip
    data_args = config["data"].setdefault("init_args", {})
    if data_root is not None:
        data_args["root"] = str(Path(data_root).expanduser().absolute())
    root = data_args.get("root")
    if isinstance(root, str) and not Path(root).is_dir():
        where = "--data.root" if data_root is not None else f"data.init_args.root of {config_path}"
        raise ConfigError(f"{where}: data folder '{root}' does not exist; if the data moved, pass --data.root "
                          "with its new folder")  # fmt: skip
    return config, read_json(done, "scoring stage record")["hash"]


def reproduce_command(settings: dict[str, Any], data_root: str | None = None) -> str:
    """The ``lsgs test`` command that scores one setting alone, into ``studies/repro/<row id>``; run from the run
    folder (its paths are relative to it, so the command holds wherever the run folder is)."""
    layout = RunLayout.of(Path())
    out = layout.study_repro_dir(row_id(settings))
    args = [
        "lsgs", "test", "-c", str(layout.scoring.config),
        "--trainer.logger=false", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
        f"--trainer.default_root_dir={out}", f"--model.init_args.output_dir={out}",
    ]  # fmt: skip
    if data_root is not None:
        args.append(f"--data.init_args.root={Path(data_root).expanduser().absolute()}")
    for key, value in settings.items():
        text = "null" if value is None else value if isinstance(value, str) else json.dumps(value)
        args.append(f"--model.init_args.{key}={text}")
    return shlex.join(args)


def _stage_config(base: dict[str, Any], settings: dict[str, Any], root: Path) -> dict[str, Any]:
    config = copy.deepcopy(base)
    init_args = config["model"].setdefault("init_args", {})
    init_args.update(settings)
    init_args["output_dir"] = None  # the study keeps results in memory; the run's outputs stay untouched
    # In-process loading, so the memoised evaluation splits persist from row to row (same items either way).
    config["data"].setdefault("init_args", {})["num_workers"] = 0
    config["trainer"].update(
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        devices=1,  # single process: the rows are exactly what the scoring stage gives (DDP gives the same)
        num_nodes=1,
        strategy="auto",
        default_root_dir=str(root),
    )
    return config


class _MemoDataset:
    """An evaluation split whose items are read once and then served from memory (same tensors every row)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.memo: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        if index not in self.memo:
            self.memo[index] = self.base[index]
        return self.memo[index]

    def __getattr__(self, name: str) -> Any:  # items, entries, ... of the wrapped dataset
        return getattr(self.base, name)


def _memoise_eval_splits(datamodule: Any) -> Any:
    """Serve the validation and test splits of ``datamodule`` from memory after their first pass (they have no
    augmentation, so every pass yields the same items); data modules without ``dataset(split)`` are left as is."""
    if not callable(getattr(datamodule, "dataset", None)):
        return datamodule
    original, memo = datamodule.dataset, {}

    def dataset(split: str) -> Any:
        if split not in ("val", "test"):
            return original(split)
        if split not in memo:
            memo[split] = _MemoDataset(original(split))
        return memo[split]

    datamodule.dataset = dataset
    return datamodule


def score_setting(
    base: dict[str, Any],
    settings: dict[str, Any],
    root: Path,
    cache: Any,
    shared: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``trainer.test`` of the run's ScoringModule with ``settings``; returns its results dict.

    ``shared`` (a dict kept across rows) holds the data module of the first row: every row reads the same
    batches, the second row on from memory.
    """
    from lsgs.stage_cli import instantiate_stage

    cli = instantiate_stage(_stage_config(base, settings, root))
    shared = {} if shared is None else shared
    datamodule = shared.setdefault("datamodule", _memoise_eval_splits(cli.datamodule))
    cli.model.cache = cache
    cli.trainer.test(cli.model, datamodule=datamodule, verbose=False)
    return cli.model.results


def _row_values(results: dict[str, Any]) -> dict[str, Any]:
    """The table values of a results dict: the mean over categories when there are several, else pooled."""
    which = "mean" if len(results.get("per_category", {})) > 1 else "pooled"
    return dict(results[which])


def run_study(
    run_dir: str | Path,
    grid: dict[str, list[Any]],
    name: str = "scoring",
    cache_gb: float = 2.0,
    kill_after_rows: int | None = None,
    data_root: str | None = None,
) -> str:
    """Score every row of ``grid`` not done yet, then write the tables; returns the markdown table. ``data_root``:
    the data's folder when it moved since the run was trained (default: the run's ``data.root``)."""
    run_dir = Path(run_dir).resolve()
    base, scoring_hash = _load_run(run_dir, data_root)
    layout = RunLayout.of(run_dir)
    rows = grid_rows(grid)
    base_args = base["model"].get("init_args", {}) or {}

    def restoration_key(settings: dict[str, Any]) -> str:
        merged = {**SCORING_DEFAULTS, **base_args, **settings}
        return json.dumps([merged.get(k) for k in RESTORATION_OPTIONS])

    def done(settings: dict[str, Any]) -> dict[str, Any] | None:
        record = read_json_or_none(layout.study_row(name, row_id(settings)))
        return record if record is not None and record.get("scoring_hash") == scoring_hash else None

    pending = sorted(
        (r for r in rows if done(r) is None), key=restoration_key
    )  # stable: grid order in groups
    if pending:
        print(f"[lsgs] scoring study: {len(rows) - len(pending)} of {len(rows)} rows done, scoring {len(pending)}",
              flush=True)  # fmt: skip
    cache = ScoringCache(max_restoration_bytes=int(cache_gb * 2**30))
    shared: dict[str, Any] = {}
    for count, settings in enumerate(progress(pending, "scoring study"), start=1):
        started = time.time()
        results = score_setting(base, settings, layout.study_work_dir(name), cache, shared)
        atomic_write_json(
            layout.study_row(name, row_id(settings)),
            {
                "settings": settings,
                "scoring_hash": scoring_hash,
                "seconds": round(time.time() - started, 2),
                "command": reproduce_command(settings, data_root),
                "values": _row_values(results),
                "calibration": results["calibration"],
                "results": {k: results[k] for k in ("pooled", "mean", "per_category") if k in results},
            },
        )
        if kill_after_rows is not None and count >= kill_after_rows:
            os.kill(os.getpid(), signal.SIGKILL)  # testing only: a hard kill in the middle of the grid
    return write_tables(run_dir, name, grid, [done(r) for r in rows])


def write_tables(
    run_dir: Path, name: str, grid: dict[str, list[Any]], records: Sequence[dict[str, Any]]
) -> str:
    """``RUN/studies/<name>.{md,csv}``: the study rows, then the run's LSGS row and its other methods (the floors)."""
    layout = RunLayout.of(run_dir)
    keys = list(grid)
    metric_keys = [k for k, _ in METRIC_COLUMNS]
    floors = []
    for method in evaluated_methods(run_dir):
        if method.kind == ABLATION_KIND:
            continue
        label = "run as trained (scoring/)" if method.name == LSGS_METHOD else f"{method.kind}: {method.label}"
        floors.append((label, _row_values(read_json(method.stage.results_json, "results"))))
    header_md = ["#", *keys, *(title for _, title in METRIC_COLUMNS), "s"]
    md_rows, csv_rows = [], []
    for number, record in enumerate(records, start=1):
        settings, values = record["settings"], record["values"]
        md_rows.append(
            [
                number,
                *(json.dumps(settings[k]) if not isinstance(settings[k], str) else settings[k] for k in keys),
                *(format_value(values.get(k)) for k in metric_keys),
                f"{record['seconds']:.0f}",
            ]
        )
        csv_rows.append(
            [
                "study",
                *(settings[k] for k in keys),
                *(values.get(k, "") for k in metric_keys),
                record["command"],
            ]
        )
    for label, values in floors:
        md_rows.append([label, *("" for _ in keys), *(format_value(values.get(k)) for k in metric_keys), ""])
        csv_rows.append([label, *("" for _ in keys), *(values.get(k, "") for k in metric_keys), ""])
    title = (
        f"Scoring study on {run_dir.name} (values in %; mean over categories when there are several; s = seconds to "
        "score the row, the first rows of a group also fill the cache). The last rows are the run's own LSGS "
        "scoring and its other methods (those of kind baseline are the floors to beat)."
    )
    commands = "\n".join(f"{i}. `{r['command']}`" for i, r in enumerate(records, start=1))
    table = markdown_table(header_md, md_rows)
    markdown = f"{title}\n\n{table}\nReproduce a row alone (from the run folder):\n\n{commands}\n"
    atomic_write_text(layout.study_table(name, "md"), markdown)
    atomic_write_text(
        layout.study_table(name, "csv"),
        csv_text(["row", *keys, *metric_keys, "command"], csv_rows),
    )
    return markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsgs study scoring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run_dir", required=True, help="a finished `lsgs pipeline` run folder")
    parser.add_argument(
        "--grid",
        required=True,
        help=f"JSON object {{option: [values]}}; options: {', '.join(GRID_OPTIONS)}",
    )
    parser.add_argument("--name", default="scoring", help="table name: RUN/studies/<name>.{md,csv}")
    parser.add_argument(
        "--cache_gb", type=float, default=2.0, help="memory for decoded restorations shared between rows"
    )
    parser.add_argument(
        "--data.root", dest="data_root", default=None, help="the data's folder, when it moved since the run"
    )
    parser.add_argument("--kill_after_rows", type=int, default=None, help=argparse.SUPPRESS)  # testing only
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """``lsgs study scoring ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lsgs study scoring --run_dir RUN --grid JSON [--name NAME] [--data.root DATA]\n\n"
              + (__doc__ or ""))  # fmt: skip
        return ""
    if argv[0] != "scoring":
        raise ConfigError(f"lsgs study: unknown study {argv[0]!r}; available: scoring")
    args = build_parser().parse_args(argv[1:])
    grid = parse_grid(args.grid)  # before anything is loaded or scored
    if not args.name or "/" in args.name:
        raise ConfigError(f"--name must be a plain file name, got {args.name!r}")
    started = time.time()
    markdown = run_study(args.run_dir, grid, args.name, args.cache_gb, args.kill_after_rows, args.data_root)
    print(markdown)
    print(f"study tables: {RunLayout.of(args.run_dir).resolved().study_table(args.name, '{md,csv}')} "
          f"({time.time() - started:.0f} s)")  # fmt: skip
    return markdown
