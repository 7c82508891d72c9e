"""``lsgs`` / ``python -m lsgs``: one entry point for single stages and whole experiments.

    lsgs fit|validate|test|predict --config STAGE.yaml [--model.x=...]   one stage, through LightningCLI
    lsgs pipeline --config EXPERIMENT.yaml [--vqvae.model.x=...]        all stages of an experiment, resumable
    lsgs ablate {codebook,attention} --config EXPERIMENT.yaml            the paper's Tables 3 and 4
    lsgs detect --run_dir RUN --images FOLDER|IMAGE|VIDEO [--method NAME]  heatmaps + scores for images, videos
    lsgs export --run_dir RUN --method NAME --format onnx|openvino|torchscript   graphs + metadata.json for deployment
    lsgs report --run_dir RUN                                            summary table + self-contained HTML report
    lsgs study scoring --run_dir RUN --grid '{"map_reference": [...]}'   re-score a run over a grid of scoring options
                       [--data.root DATA]                            (its data's folder, when it moved)

Every ``config.yaml`` the pipeline saves in a stage folder is a valid single-stage config. It names the paths
inside the run relative to its own folder (``./...``, ``../...``); a stage command resolves such values of a
``--config`` file against that file's folder, so ``lsgs test -c RUN/scoring/config.yaml`` works from any working
directory and after the run folder was moved. Paths given on the command line are relative to the working
directory, as usual.

Only what a command uses is imported: ``lsgs --help`` and ``lsgs detect --help`` load neither torch nor Lightning.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = __doc__


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lsgs.distributed import teardown_process_group
    from lsgs.errors import LSGSError

    command = argv[0] if argv else "--help"
    try:
        if command == "pipeline":
            from lsgs.pipeline import main as pipeline_main

            pipeline_main(argv[1:])
        elif command == "ablate":
            from lsgs.ablations import main as ablate_main

            ablate_main(argv[1:])
        elif command == "report":
            from lsgs.reports.summary import main as report_main

            report_main(argv[1:])
        elif command == "detect":
            from lsgs.detect import main as detect_main

            detect_main(argv[1:])
        elif command == "export":
            from lsgs.export import main as export_main

            export_main(argv[1:])
        elif command == "study":
            from lsgs.study import main as study_main

            study_main(argv[1:])
        elif command in ("-h", "--help", "help"):
            print(USAGE)
        else:
            from lsgs.stage_cli import StageCLI

            StageCLI(args=stage_arguments(argv))
    except LSGSError as error:
        if os.environ.get("LSGS_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as stop:
        # Lightning stops a stage on SIGTERM by raising SIGTERMException, a SystemExit with no code, which would
        # exit 0: a scheduler would then read a pre-empted run as finished. Exit as a SIGTERM'd process does.
        if type(stop).__name__ == "SIGTERMException":
            print("error: stopped by SIGTERM; re-run the same command to resume", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        raise
    else:
        # A multi-process run (torchrun, Lightning-launched DDP) of any command ends here: all ranks meet, then
        # the process group is destroyed, so gloo does not abort the process at interpreter exit.
        teardown_process_group(barrier=True)
    finally:
        teardown_process_group(barrier=False)  # error path (no barrier: other ranks may be gone); else a no-op


def stage_arguments(argv: Sequence[str]) -> list[str]:
    """A stage command's arguments with each ``--config`` file whose values name paths relative to it (a run's
    stage config: ``lsgs.layout.store_paths``) replaced by its content with those paths resolved against the
    file's folder; other arguments, and files without such paths, unchanged."""
    from lsgs.methods.registry import CONFIG_OPTIONS

    def resolved(value: str) -> str:
        import yaml

        from lsgs.layout import resolve_paths

        path = Path(value)
        try:
            config = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (OSError, yaml.YAMLError):
            return value  # the stage parser reports an unreadable file
        if not isinstance(config, dict):
            return value
        stored = resolve_paths(config, path.parent)
        return value if stored == config else yaml.safe_dump(stored, sort_keys=False)

    out: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        option, equals, value = argument.partition("=")
        if option in CONFIG_OPTIONS and equals:
            out.append(f"{option}={resolved(value)}")
        elif argument in CONFIG_OPTIONS:
            following = next(arguments, None)
            out += [argument] if following is None else [argument, resolved(following)]
        else:
            out.append(argument)
    return out


if __name__ == "__main__":
    main()
