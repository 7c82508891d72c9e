"""Moved to :mod:`lsgs.reports.figures`; re-exported here until every importer has switched (issue 11, in
progress)."""

from lsgs.reports.figures import colorize, image_grid, log_image, log_table, save_png, to_uint8_image

__all__ = ["colorize", "image_grid", "log_image", "log_table", "save_png", "to_uint8_image"]
