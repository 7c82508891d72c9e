"""Anomaly-detection methods evaluated by the shared harness (``lsgs.evaluation``) besides LSGS.

The built-in methods of kind ``baseline``, with the same data modules, ROI masking and smoothing, calibration on
validation normals, metrics and output files as LSGS; a method that does not beat these floors is not worth its
complexity:

- ``intensity`` (``intensity.py``): the image itself, standardised with training statistics.
- ``pixel_gaussian`` (``pixel_gaussian.py``): a per-pixel Gaussian of the training images.
- ``ae`` / ``vae`` (``autoencoder.py``, ``variational: true`` for the VAE): reconstruction error of a conv
  autoencoder / VAE with the VQ-VAE's encoder/decoder shape (paper Table 1).
- ``patchcore`` (``patchcore.py``): nearest-neighbour distance of frozen ImageNet patch features to a coreset
  memory bank (Roth et al., CVPR 2022), the practitioner's baseline.

And a contender of kind ``method``: ``hvq_trans`` (``hvq_trans.py``, HVQ-Trans, NeurIPS 2023), with configs of its
own (``experiments/hvq_trans*.yaml``), not in the default set (its training budget).

``base.py`` holds what they share, ``feature_method.py`` what the two feature methods share (backbone, input size,
category switch), ``feature_cache.py`` their cached training features, ``statistics.py`` the pure maths of the
statistical two.

``BUILTIN_METHODS`` maps each built-in method's name (its ``methods.<name>`` key in an experiment config) to the
``class_path`` of its LightningModule, so every experiment parser declares it (``--methods.<name>.*`` overrides
work without a config entry). A method of your own needs no entry here: its config entry registers it
(``lsgs.methods.registry``).
"""

BUILTIN_METHODS: dict[str, str] = {
    "intensity": "lsgs.methods.intensity.IntensityBaseline",
    "pixel_gaussian": "lsgs.methods.pixel_gaussian.PixelGaussianBaseline",
    "ae": "lsgs.methods.autoencoder.AutoencoderBaseline",
    "vae": "lsgs.methods.autoencoder.AutoencoderBaseline",
    "patchcore": "lsgs.methods.patchcore.PatchCoreBaseline",
}
