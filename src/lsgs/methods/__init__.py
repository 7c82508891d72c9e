"""Anomaly-detection methods evaluated by the shared harness (``lsgs.evaluation``).

``BUILTIN_METHODS`` maps each built-in method's name (the ``baselines.<name>`` key of an experiment config) to the
``class_path`` of its LightningModule. The registry (``lsgs.methods.registry``) reads it; a new method is one
module plus one entry here (or one entry registered from outside ``lsgs``).
"""

BUILTIN_METHODS: dict[str, str] = {
    "intensity": "lsgs.modules.baselines.IntensityBaseline",
    "pixel_gaussian": "lsgs.modules.baselines.PixelGaussianBaseline",
    "ae": "lsgs.modules.baselines.AutoencoderBaseline",
    "vae": "lsgs.modules.baselines.AutoencoderBaseline",
}
