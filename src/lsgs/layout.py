"""Every path of a run folder, named once.

A run folder (``runs/<name>`` unless ``--run_dir`` says otherwise)::

    run.json                      run id + layout version (kept across re-runs)
    experiment.yaml               the parsed experiment config
    results.{json,csv,md}         LSGS's results, copied from scoring/
    summary.{md,csv}, report.html every evaluated method side by side (``lsgs report``)
    <stage>/                      vqvae, aggregator, finetune, transformer, scoring, methods/<method>
        stage.json                hash of the config that started the stage
        config.yaml               the stage's LightningCLI config (re-runnable alone)
        done.json                 written last: the stage finished with that hash
        checkpoints/last.ckpt     rolling resume checkpoint of training stages
        vqvae.ckpt, ...           the stage's output (STAGE_OUTPUTS)
        calibration.json, results.{json,csv,md}, image_scores.csv, curves/, heatmaps/   evaluation outputs
        logs/, tensorboard/, wandb/                                                     logger folders
    ablations/<table>.{md,csv}, ablations/<table>-<variant>/   ``lsgs ablate``
    studies/<name>.{md,csv}, studies/<name>/rows/, studies/repro/<row>/   ``lsgs study``
    detect/<images folder>/        ``lsgs detect`` (scores.csv, thresholds.txt, *_heatmap.png)
    exports/<method>-<format>/     ``lsgs export`` (metadata.json and the graphs, ``ExportLayout``)

This module sits in the lowest layer (it imports nothing of the project), so the evaluation harness, the runner,
the reports and the command-line tools all take their file names from here. No other file spells them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bumped when a change makes the stage folders of older runs unusable (stage hashes that cover moved class paths,
# renamed folders, paths stored differently). A run folder of another version cannot be resumed or read: start a
# new run.
LAYOUT_VERSION = 3

DEFAULT_RUNS_ROOT = Path("runs")
METHOD_STAGE_PREFIX = "methods"  # stage key of an evaluated method other than LSGS: methods.<method>
LSGS_STAGES = ("vqvae", "aggregator", "finetune", "transformer", "scoring")
# What a finished stage must have produced (relative to its folder).
STAGE_OUTPUTS = {
    "vqvae": "vqvae.ckpt",
    "aggregator": "aggregated.ckpt",
    "finetune": "vqvae_ft.ckpt",
    "transformer": "transformer.ckpt",
    "scoring": "results.json",
}
AGGREGATION_REPORT = "aggregation.json"


@dataclass(frozen=True)
class StageLayout:
    """The files of one stage folder (a pipeline stage, or any folder an evaluation writes into)."""

    folder: Path

    @classmethod
    def of(cls, output_dir: str | Path) -> StageLayout:
        """The layout of a folder a module only knows as its ``output_dir``."""
        return cls(Path(output_dir))

    # run bookkeeping (runner)
    @property
    def done(self) -> Path:
        return self.folder / "done.json"

    @property
    def stage_record(self) -> Path:
        return self.folder / "stage.json"

    @property
    def config(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def checkpoints_dir(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints_dir / "last.ckpt"

    def output(self, stage: str) -> Path:
        """The output file a finished ``stage`` leaves (``vqvae.ckpt``, ...; ``results.json`` for evaluations)."""
        return self.folder / STAGE_OUTPUTS.get(stage.split(".")[0], STAGE_OUTPUTS["scoring"])

    @property
    def aggregated_checkpoint(self) -> Path:
        return self.folder / STAGE_OUTPUTS["aggregator"]

    @property
    def aggregation_report(self) -> Path:
        return self.folder / AGGREGATION_REPORT

    # evaluation outputs (evaluation harness)
    @property
    def calibration(self) -> Path:
        return self.folder / "calibration.json"

    @property
    def results_json(self) -> Path:
        return self.folder / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.folder / "results.csv"

    @property
    def results_md(self) -> Path:
        return self.folder / "results.md"

    @property
    def results_files(self) -> tuple[Path, Path, Path]:
        """``results.{json,csv,md}``, the files the runner copies to the top of the run folder."""
        return self.results_json, self.results_csv, self.results_md

    @property
    def image_scores(self) -> Path:
        return self.folder / "image_scores.csv"

    @property
    def heatmaps_dir(self) -> Path:
        return self.folder / "heatmaps"

    def heatmap(self, category: str, index: int) -> Path:
        return self.heatmaps_dir / f"{category}_{index:05d}.png"

    @property
    def curves_dir(self) -> Path:
        return self.folder / "curves"

    @property
    def curves(self) -> Path:
        return self.curves_dir / "curves.npz"

    def curve_plot(self, kind: str) -> Path:
        """``curves/roc.png`` or ``curves/pr.png``."""
        return self.curves_dir / f"{kind}.png"

    # logger folders (names given to the loggers, relative to the stage folder)
    LOGS = "logs"
    TENSORBOARD = "tensorboard"

    @property
    def csv_log(self) -> Path:
        return self.folder / self.LOGS / "metrics.csv"

    @property
    def wandb_dir(self) -> Path:
        return self.folder / "wandb"


# Files of an evaluation, in the order the harness writes them (results.json last: it marks completeness).
def evaluation_files(stage: StageLayout) -> tuple[Path, ...]:
    return (stage.results_md, stage.results_csv, stage.calibration, stage.image_scores, stage.results_json)


@dataclass(frozen=True)
class RunLayout:
    """The files and folders of one run folder."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> RunLayout:
        return cls(Path(run_dir))

    @classmethod
    def for_experiment(cls, config: Any) -> RunLayout:
        """The run folder of a parsed experiment: ``--run_dir``, else ``runs/<name>`` (not resolved)."""
        return cls(Path(config.run_dir or DEFAULT_RUNS_ROOT / config.name))

    def resolved(self) -> RunLayout:
        return RunLayout(self.root.resolve())

    # top-level files
    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def experiment(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def results_files(self) -> tuple[Path, Path, Path]:
        return self.results_json, self.results_csv, self.results_md

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    # stages
    def stage(self, key: str) -> StageLayout:
        """``stage("vqvae")`` -> ``<root>/vqvae``; ``stage("methods.ae")`` -> ``<root>/methods/ae``."""
        return StageLayout(self.root.joinpath(*key.split(".")))

    @property
    def scoring(self) -> StageLayout:
        return self.stage("scoring")

    @property
    def methods_dir(self) -> Path:
        """The folder holding one stage folder per evaluated method besides LSGS."""
        return self.root / METHOD_STAGE_PREFIX

    def method(self, name: str) -> StageLayout:
        return self.stage(method_stage_key(name))

    def stage_dirs(self) -> list[Path]:
        """Stage folders that exist (LSGS stages, then method folders), for the layout-version check."""
        found = [self.root / s for s in LSGS_STAGES if (self.root / s).is_dir()]
        if self.methods_dir.is_dir():
            found += sorted(p for p in self.methods_dir.iterdir() if p.is_dir())
        return found

    # ablations
    @property
    def ablations_dir(self) -> Path:
        return self.root / "ablations"

    def ablation(self, table: str, variant: str) -> RunLayout:
        """The run folder of one ablation variant (``ablations/<table>-<variant>``, ``/`` dropped: ``w/o``)."""
        return RunLayout(self.ablations_dir / f"{table}-{variant.replace('/', '')}")

    def ablation_table(self, table: str, suffix: str) -> Path:
        return self.ablations_dir / f"{table}.{suffix}"

    def ablation_runs(self) -> list[tuple[str, RunLayout]]:
        """``(variant folder name, layout)`` of every ablation variant folder, sorted."""
        if not self.ablations_dir.is_dir():
            return []
        return [(p.name, RunLayout(p)) for p in sorted(self.ablations_dir.iterdir()) if p.is_dir()]

    # studies
    @property
    def studies_dir(self) -> Path:
        return self.root / "studies"

    def study_table(self, name: str, suffix: str) -> Path:
        return self.studies_dir / f"{name}.{suffix}"

    def study_row(self, name: str, row: str) -> Path:
        return self.studies_dir / name / "rows" / f"{row}.json"

    def study_work_dir(self, name: str) -> Path:
        return self.studies_dir / name / "work"

    def study_repro_dir(self, row: str) -> Path:
        return self.studies_dir / "repro" / row

    # detect
    def detect_dir(self, images: str | Path) -> Path:
        return self.root / "detect" / Path(images).resolve().name

    # export
    def export_dir(self, method: str, export_format: str) -> Path:
        """The default folder of ``lsgs export``: ``exports/<method>-<format>``."""
        return self.root / "exports" / f"{method}-{export_format}"


@dataclass(frozen=True)
class DetectLayout:
    """The files ``lsgs detect`` writes into its output folder."""

    folder: Path

    @property
    def scores(self) -> Path:
        return self.folder / "scores.csv"

    @property
    def thresholds(self) -> Path:
        return self.folder / "thresholds.txt"

    def heatmap(self, image_path: str | Path) -> Path:
        return self.folder / f"{Path(image_path).stem}_heatmap.png"


# The files of each export format besides the metadata: graph name -> file names (OpenVINO IR: model + weights).
EXPORT_GRAPH_SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml", ".bin"), "torchscript": (".pt",)}


@dataclass(frozen=True)
class ExportLayout:
    """The files of an export folder (``lsgs export``): ``metadata.json`` and one file (ONNX, TorchScript) or two
    (OpenVINO IR ``.xml`` + ``.bin``) per graph, named after the graph. Names only, relative to the folder, so the
    folder can be copied anywhere."""

    folder: Path

    @property
    def metadata(self) -> Path:
        return self.folder / "metadata.json"

    @staticmethod
    def graph_file(graph: str, export_format: str) -> str:
        """The file name (relative to the folder) the runtime opens for ``graph`` in ``export_format``."""
        return f"{graph}{EXPORT_GRAPH_SUFFIXES[export_format][0]}"

    def graph_files(self, graph: str, export_format: str) -> list[Path]:
        """Every file ``graph`` has in ``export_format`` (what a copy of the export must keep)."""
        return [self.folder / f"{graph}{suffix}" for suffix in EXPORT_GRAPH_SUFFIXES[export_format]]


def method_stage_key(name: str) -> str:
    """Stage key of an evaluated method: ``lsgs`` -> ``scoring``, any other name -> ``methods.<name>``."""
    return "scoring" if name == "lsgs" else f"{METHOD_STAGE_PREFIX}.{name}"
