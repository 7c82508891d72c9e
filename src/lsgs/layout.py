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
    detect/<images folder>/        ``lsgs detect`` (scores.csv, thresholds.json, heatmaps/, videos/)
    exports/<method>-<format>/     ``lsgs export`` (metadata.json and the graphs, ``ExportLayout``)

A run folder is relocatable: a path inside it is stored relative to the folder of the file that names it, spelled
``./...`` or ``../...`` (a stage's ``config.yaml`` names its upstream checkpoints ``../finetune/vqvae_ft.ckpt`` and
its own folder ``.``); :func:`store_paths` writes that form and :func:`resolve_paths` reads it back. Paths outside
the run (the data, the decoded-array cache) stay absolute: they are where the data is.

This module sits in the lowest layer (it imports nothing of the project), so the evaluation harness, the runner,
the reports and the command-line tools all take their file names from here. No other file spells them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

# Bumped when a change makes the stage folders of older runs unusable (stage hashes that cover moved class paths,
# renamed folders, paths stored differently). A run folder of another version cannot be resumed or read: start a
# new run.
LAYOUT_VERSION = 3

DEFAULT_RUNS_ROOT = Path("runs")
DETECT_FOLDER = "detect"  # lsgs detect's default output parent, in a run folder or an export folder
METHOD_STAGE_PREFIX = "methods"  # stage key of an evaluated method other than LSGS: methods.<method>
LSGS_METHOD = "lsgs"  # the method name of LSGS itself; its evaluation is the ``scoring`` stage
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
        """``detect/<name>``: the default output folder of ``lsgs detect`` for the folder (or file) ``images``."""
        return self.root / DETECT_FOLDER / Path(images).resolve().name

    # export
    def export_dir(self, method: str, export_format: str) -> Path:
        """The default folder of ``lsgs export``: ``exports/<method>-<format>``."""
        return self.root / "exports" / f"{method}-{export_format}"


@dataclass(frozen=True)
class DetectLayout:
    """The files ``lsgs detect`` writes into its output folder.

    An output keeps its input's path relative to the ``--images`` folder (its name alone for a single file), so no
    two inputs share an output file: ``broken_large/000.png`` and ``contamination/000.png`` get
    ``heatmaps/broken_large/000.png`` and ``heatmaps/contamination/000.png``. A heatmap is written in its input's
    format (a ``.jpg`` input gets a ``.jpg`` heatmap), an annotated video in its input's container.
    """

    folder: Path

    @property
    def scores(self) -> Path:
        return self.folder / "scores.csv"

    @property
    def thresholds(self) -> Path:
        return self.folder / "thresholds.json"

    @property
    def heatmaps_dir(self) -> Path:
        return self.folder / "heatmaps"

    @property
    def videos_dir(self) -> Path:
        return self.folder / "videos"

    def heatmap(self, relative_input: str | Path) -> Path:
        """The heatmap panel of the image at ``relative_input`` (relative to the ``--images`` folder)."""
        return self.heatmaps_dir / _inside(relative_input)

    def video(self, relative_input: str | Path) -> Path:
        """The annotated copy of the video at ``relative_input`` (relative to the ``--images`` folder)."""
        return self.videos_dir / _inside(relative_input)


def _inside(relative: str | Path) -> Path:
    """``relative`` as a path that stays inside the folder it is joined to (no root, no ``..``)."""
    path = PurePosixPath(Path(relative).as_posix())
    assert not path.is_absolute() and ".." not in path.parts, relative
    return Path(path)


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
    return "scoring" if name == LSGS_METHOD else f"{METHOD_STAGE_PREFIX}.{name}"


# ----------------------------------------------------------------------------------- paths stored in a run folder
RELATIVE_PREFIXES = ("./", "../")
HERE = "."


def is_stored_relative(value: Any) -> bool:
    """Whether ``value`` is a path stored relative to its file's folder: ``.``, ``./...`` or ``../...``."""
    return isinstance(value, str) and (value == HERE or value.startswith(RELATIVE_PREFIXES))


def store_paths(config: Any, folder: str | Path, roots: Sequence[str | Path]) -> Any:
    """``config`` (nested dicts and lists) with every absolute path string inside one of ``roots`` rewritten
    relative to ``folder`` (the folder of the file it is written to), as ``.``, ``./x`` or ``../x``.

    Args:
        config: a parsed config (what a stage's ``config.yaml`` holds).
        folder: the folder of the file the config is written to (absolute).
        roots: absolute folders whose contents move with the file (the run folder, and runs it reuses stages of).

    Returns:
        A new config; strings outside ``roots`` (the data, the cache, every non-path value) are unchanged.
    """
    folder, roots = Path(folder), [Path(root) for root in roots]

    def store(value: str) -> str:
        path = Path(value)
        if not path.is_absolute() or not any(path == root or root in path.parents for root in roots):
            return value
        relative = Path(os.path.relpath(path, folder)).as_posix()
        return relative if relative == HERE or relative.startswith("../") else f"./{relative}"

    return _map_strings(config, store)


def resolve_paths(config: Any, folder: str | Path) -> Any:
    """The inverse of :func:`store_paths`: every ``.``, ``./x`` or ``../x`` string of ``config`` as an absolute
    path under ``folder`` (the folder of the file it was read from); every other value unchanged."""
    folder = Path(folder).absolute()

    def resolve(value: str) -> str:
        return os.path.normpath(folder / value) if is_stored_relative(value) else value

    return _map_strings(config, resolve)


def _map_strings(value: Any, function: Any) -> Any:
    if isinstance(value, str):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_strings(item, function) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(item, function) for item in value]
    return value


def read_stage_config(path: str | Path) -> dict[str, Any]:
    """A stage's saved LightningCLI config (``<stage>/config.yaml``) with its stored-relative paths resolved
    against the file's folder, so it works wherever the run folder now is and from any working directory."""
    import yaml

    path = Path(path)
    config = yaml.safe_load(path.read_text())
    return resolve_paths(config, path.parent) if isinstance(config, dict) else config
