"""Registry of built-in models and loading of user models given as ``file.py:factory``."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from split.errors import InputShapeError

DATASETS = ("digits", "mnist", "synthetic")


@dataclass(frozen=True)
class ModelSpec:
    """What the toolkit needs to know about a model besides its weights.

    Attributes:
        name: Zoo name, or the ``file.py:factory`` reference the model was built from.
        factory: Builds an untrained model for ``input_shape``.
        input_shape: Shape of one sample, without the batch dimension, e.g. ``(1, 8, 8)``.
        num_classes: Number of output logits.
        default_cut: Cut point used when the user names none ("" if the model has none).
        dataset: Which data the model is meant for: "digits", "mnist" or "synthetic".
        shaped_factory: Optional builder for other input shapes (e.g. 3-channel images).
    """

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    default_cut: str
    dataset: str
    shaped_factory: Callable[[tuple[int, ...]], nn.Module] | None = None

    def __post_init__(self) -> None:
        if not self.input_shape or any(int(d) <= 0 for d in self.input_shape):
            raise ValueError(f"input_shape must be positive dimensions, got {self.input_shape}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")


class DigitsMLP(nn.Module):
    """Three-layer perceptron for 8x8 digits (~6.6k parameters)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 64)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(64, 32)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(self.flatten(x)))
        return self.fc3(self.act2(self.fc2(x)))


class DigitsMLPTanh(nn.Module):
    """``DigitsMLP``'s layers with tanh activations and inputs mapped from [0, 1] to [-1, 1].

    A DP-friendly variant: DP-SGD clips every per-sample gradient, and bounded activations keep
    those gradients from growing, so less signal is lost to clipping (Papernot et al. 2021,
    "Tempered Sigmoid Activations for Deep Learning with Differential Privacy", AAAI: tanh is
    the tempered sigmoid with scale 2, inverse temperature 2, offset 1). The fixed, parameterless
    rescaling centres the inputs for the zero-centred tanh without looking at any data (Tramer
    & Boneh 2021 on data-independent normalization). Parameter shapes equal ``DigitsMLP``'s.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 64)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(64, 32)
        self.act2 = nn.Tanh()
        self.fc3 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(2.0 * self.flatten(x) - 1.0))
        return self.fc3(self.act2(self.fc2(x)))


class SmallCNN(nn.Module):
    """Two conv layers with pooling, then two linear layers; default cut after ``pool2``."""

    def __init__(
        self, in_channels: int, side: int, channels: tuple[int, int], hidden: int, num_classes: int
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * (side // 4) ** 2, hidden)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        return self.fc2(self.act3(self.fc1(self.flatten(x))))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    # Bias is redundant before BatchNorm (BN's shift absorbs it), as in MobileNetV2.
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, optional skip ADD."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, hidden, 1),
            nn.ReLU6(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *_conv_bn(hidden, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetMini(nn.Module):
    """A four-block MobileNetV2-style network (~5k parameters) for small images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 8, 3, stride=2), nn.ReLU6())
        self.block1 = InvertedResidual(8, 8, 1, 2)
        self.block2 = InvertedResidual(8, 16, 2, 2)
        self.block3 = InvertedResidual(16, 16, 1, 2)
        self.block4 = InvertedResidual(16, 16, 1, 2)
        self.head = nn.Sequential(*_conv_bn(16, 32, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(self.head(x))))


def _mobilenet_for(shape: tuple[int, ...]) -> nn.Module:
    return MobileNetMini(in_channels=shape[0])


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("digits-mlp", DigitsMLP, (1, 8, 8), 10, "act1", "digits"),
        ModelSpec("digits-mlp-tanh", DigitsMLPTanh, (1, 8, 8), 10, "act1", "digits"),
        ModelSpec(
            "digits-cnn",
            lambda: SmallCNN(1, 8, (8, 16), 32, 10),
            (1, 8, 8),
            10,
            "pool2",
            "digits",
        ),
        ModelSpec(
            "mnist-cnn",
            lambda: SmallCNN(1, 28, (8, 16), 32, 10),
            (1, 28, 28),
            10,
            "pool2",
            "mnist",
        ),
        ModelSpec(
            "mobilenet-mini",
            MobileNetMini,
            (1, 28, 28),
            10,
            "block2",
            "mnist",
            shaped_factory=_mobilenet_for,
        ),
    )
}


def list_models() -> list[str]:
    """Returns the names of the built-in models, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Returns the spec of a built-in model.

    Raises:
        ValueError: ``name`` is not a built-in model; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"model={name!r} is not a built-in model; known models: {', '.join(list_models())}"
            " (or pass path/to/file.py:factory)"
        ) from None


def is_file_ref(name_or_path: str) -> bool:
    """True if ``name_or_path`` looks like ``path/to/file.py:factory`` rather than a zoo name."""
    path, sep, attr = name_or_path.rpartition(":")
    return bool(sep) and path.endswith(".py") and attr.isidentifier()


def _load_file_spec(ref: str, base_dir: Path | None) -> tuple[ModelSpec, bool]:
    path_str, _, attr = ref.rpartition(":")
    path = Path(path_str)
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.is_file():
        raise ValueError(f"model file {path_str!r} not found (model={ref!r})")
    # A unique module name per file content, so two model files never shadow each other.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    mod_name = f"_edgesplit_model_{digest}"
    module = sys.modules.get(mod_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[mod_name]
            raise
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model file {path_str!r} has no callable {attr!r} (model={ref!r})")
    shape = getattr(module, "INPUT_SHAPE", None)
    spec = ModelSpec(
        name=ref,
        factory=factory,
        input_shape=tuple(int(d) for d in shape) if shape is not None else (1,),
        num_classes=int(getattr(module, "NUM_CLASSES", 1)),
        default_cut=str(getattr(module, "DEFAULT_CUT", "")),
        dataset=str(getattr(module, "DATASET", "synthetic")),
    )
    return spec, shape is not None


def _probe(model: nn.Module, shape: tuple[int, ...], ref: str) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros((2, *shape)))
    except Exception as exc:  # any shape mismatch surfaces as a torch RuntimeError/ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputShapeError(
            f"input_shape={tuple(shape)} does not fit model {ref!r}: {first}"
        ) from None
    finally:
        model.train(was_training)


def build_model(
    name_or_path: str,
    *,
    seed: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    base_dir: str | Path | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Builds a model from the zoo or from a user file.

    Args:
        name_or_path: A zoo name (see ``list_models()``) or ``path/to/file.py:factory``, where
            ``factory()`` returns an ``nn.Module``; the file may define ``INPUT_SHAPE``,
            ``NUM_CLASSES``, ``DEFAULT_CUT`` and ``DATASET``.
        seed: Seeds the weight initialisation (without touching the global torch RNG).
        input_shape: Per-sample input shape; required for a file without ``INPUT_SHAPE``.
        base_dir: Directory relative file references are also looked up in (split directories).

    Returns:
        The model (in train mode) and its spec, whose ``input_shape`` and ``num_classes`` are the
        ones actually used.

    Raises:
        ValueError: Unknown model, missing file or factory, or an input shape the model rejects.
    """
    if is_file_ref(name_or_path):
        spec, has_shape = _load_file_spec(name_or_path, Path(base_dir) if base_dir else None)
        if input_shape is None and not has_shape:
            raise ValueError(
                f"model={name_or_path!r} defines no INPUT_SHAPE; pass input_shape "
                "(e.g. --input-shape 1,8,8)"
            )
    else:
        spec = get_spec(name_or_path)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else spec.input_shape
    if any(d <= 0 for d in shape):
        raise InputShapeError(f"input_shape must be positive dimensions, got {shape}")
    factory: Callable[[], nn.Module] = spec.factory
    if shape != spec.input_shape and spec.shaped_factory is not None:
        shaped = spec.shaped_factory

        def factory() -> nn.Module:
            return shaped(shape)

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory of {name_or_path!r} must return an nn.Module, got {type(model)}")
    out = _probe(model, shape, name_or_path)
    num_classes = int(out.shape[-1]) if out.dim() >= 2 else spec.num_classes
    if not is_file_ref(name_or_path) and num_classes != spec.num_classes:
        raise ValueError(
            f"model {name_or_path!r} gives {num_classes} outputs, spec says {spec.num_classes}"
        )
    spec = dataclasses.replace(spec, factory=factory, input_shape=shape, num_classes=num_classes)
    model.train()
    return model, spec
