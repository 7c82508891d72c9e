"""One stage from its LightningCLI config: the parser, the up-front check and the instantiation.

A stage config is an ordinary LightningCLI config (``seed_everything``, ``trainer``, ``model`` and ``data`` with
``class_path``/``init_args``): what ``lsgs fit -c STAGE.yaml`` reads and what the run layer (``lsgs.run``) saves
as ``<stage>/config.yaml``. Both go through :class:`StageCLI`, so a saved config re-runs alone unchanged.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lsgs.classpath import import_class
from lsgs.errors import ConfigError


class StageCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule chosen by ``class_path``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            **kwargs,
        )


def instantiate_stage(config: dict[str, Any]) -> StageCLI:
    """Build trainer, model and data module of one stage from its LightningCLI config (a dict), without running.

    The returned CLI holds ``trainer``, ``model``, ``datamodule``, and ``parser``/``config`` to dump the config.
    """
    with warnings.catch_warnings():
        # LightningCLI warns when sys.argv holds arguments besides `args`; here they belong to another command.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return StageCLI(args=config, run=False, save_config_callback=None, parser_kwargs={"exit_on_error": False})


def validate_stage_config(stage: str, config: dict[str, Any]) -> None:
    """Check a stage's LightningCLI config (trainer keys, model and data arguments and their types) up front,
    so a typo fails before any stage trains, not when its stage comes. Raises a one-line ``ConfigError``."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--seed_everything", type=bool | int, default=True)
    try:
        parser.parse_object(config)
    except ArgumentError as error:
        raise ConfigError(f"stage '{stage}': {condense_parser_error(str(error))}") from None


def condense_parser_error(text: str) -> str:
    """jsonargparse's multi-line validation report -> the one line that says what is wrong."""
    unknown = re.search(r"Option '([^']+)' is not accepted", text)
    owner = re.search(r"Problem with given class_path '([^']+)'", text)
    key = re.search(r'Parser key "([^"]+)"', text)
    where = key.group(1) if key else "config"
    if unknown and owner:
        try:
            # jsonargparse's own reading of the signature, so arguments passed on through `**kwargs` are listed.
            parser = LightningArgumentParser(exit_on_error=False)
            parser.add_class_arguments(import_class(owner.group(1)))
            names = dict.fromkeys(key.split(".")[0] for key in parser.get_defaults().keys())  # noqa: SIM118 (a Namespace)
            valid = f"; valid: {', '.join(names)}"
        except Exception:  # the class itself may be the problem; the message is still useful without the list
            valid = ""
        return f"{where}: {owner.group(1)} has no argument '{unknown.group(1)}'{valid}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [
        line for line in lines
        if not line.startswith(("Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>",
                                "Does not validate against any of the Union subtypes"))
    ]
    return " ".join(useful) if useful else text
