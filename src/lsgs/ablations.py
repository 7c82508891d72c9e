"""``lsgs ablate codebook|attention``: the paper's Table 3 and Table 4 on one experiment config.

The main experiment runs in its run folder; each other variant runs in ``<run_dir>/ablations/<table>-<variant>``
and reuses every finished stage of the main run whose config is identical (same hash), so the variants share
the stages they have in common (e.g. all attention variants use the same fine-tuned VQ-VAE).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import Namespace

from lsgs.distributed import process_group_teardown
from lsgs.errors import ConfigError
from lsgs.io import atomic_write_text, read_json
from lsgs.layout import RunLayout
from lsgs.reports.tables import comparison_tables
from lsgs.run import build_parser, is_global_zero, parse_experiment, plan_experiment, run_experiment
from lsgs.run.loggers import log_table_to_wandb, wandb_enabled

TABLES = ("codebook", "attention")


def _variants(table: str) -> list[tuple[str, dict[str, Any], bool]]:
    """``(variant name, config changes, is_main)``; the main variant is the method as configured."""
    if table == "codebook":
        return [("aggregated", {"aggregate": True}, True), ("learned", {"aggregate": False}, False)]
    return [
        ("global", {"transformer.model.init_args.attention": "global"}, True),
        (
            "causal",
            {
                "transformer.model.class_path": "lsgs.modules.CausalTransformer",
                "transformer.model.init_args.attention": "causal",
            },
            False,
        ),
        ("w/o", {"transformer.model": None}, False),
    ]


def _apply(config: Namespace, changes: dict[str, Any]) -> Namespace:
    config = copy.deepcopy(config)
    for key, value in changes.items():
        if key.startswith("transformer.model.") and config.transformer.model is None:
            raise ConfigError("the attention ablation needs a transformer.model in the experiment config")
        config[key] = value
    return config


def run_ablation(table: str, config: Namespace) -> tuple[str, str]:
    """Run every variant of ``table`` and return the ``(markdown, csv)`` comparison."""
    if table not in TABLES:
        raise ConfigError(f"unknown ablation {table!r}; choose one of {TABLES}")
    main = RunLayout.for_experiment(config)
    named_results: list[tuple[str, dict[str, Any]]] = []
    extra: dict[str, dict[str, Any]] = {}
    for name, changes, is_main in _variants(table):
        variant = _apply(config, changes)
        variant.run_dir = str(main.root if is_main else main.ablation(table, name).root)
        print(f"[lsgs] ablation {table}: variant '{name}' in {variant.run_dir}", flush=True)
        experiment = plan_experiment(variant, reuse_dirs=[] if is_main else [main.root])
        results = run_experiment(experiment)
        if results is None:
            raise RuntimeError(f"variant '{name}' finished without results")
        named_results.append((name, results))
        if table == "codebook":
            stage = experiment.plans["finetune" if variant.aggregate else "vqvae"]
            report = read_json(stage.layout.done, "stage record")["metrics"]
            extra[name] = {
                "effective size": report.get("effective_size"),
                "codebook size": report.get("codebook_size"),
                "rec. loss (val L1)": report.get("val_l1"),
            }
    # Paper order: learned before aggregated; w/o, causal, global.
    named_results.reverse()
    markdown, table_csv = comparison_tables(named_results, extra=extra)
    atomic_write_text(main.ablation_table(table, "md"), markdown)
    atomic_write_text(main.ablation_table(table, "csv"), table_csv)
    return markdown, table_csv


def log_ablation_to_wandb(config: Namespace, table: str, table_csv: str) -> None:
    """The ablation table as a W&B table, in a small run of the experiment's group (offline unless
    WANDB_MODE=online; nothing when W&B is off)."""
    if not wandb_enabled(config.logger):
        return
    main = RunLayout.for_experiment(config).resolved()
    run_id = read_json(main.run_record, "run record")["run_id"]
    log_table_to_wandb(config, run_id, f"ablation-{table}", main.ablations_dir, table_csv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lsgs ablate {codebook,attention} --config EXPERIMENT.yaml [overrides]\n\n" + __doc__)
        build_parser().print_help()
        return
    table, rest = argv[0], argv[1:]
    if table not in TABLES:
        raise ConfigError(f"unknown ablation {table!r}; choose one of {TABLES}")
    _, config = parse_experiment(rest)
    with process_group_teardown():  # under DDP: barrier + destroy_process_group on every rank
        markdown, table_csv = run_ablation(table, config)
    if not is_global_zero():  # under DDP the table, W&B run and summary are rank 0's
        return
    log_ablation_to_wandb(config, table, table_csv)
    from lsgs.reports.summary import write_summary

    main_layout = RunLayout.for_experiment(config)
    write_summary(main_layout.resolved().root)
    print()
    print(markdown)
    print(f"ablation table: {main_layout.ablation_table(table, 'md')}")
