"""The two screening models and the config that builds them.

`ModelConfig` is saved with every trained model (model.json), so `build_model` can
rebuild the exact architecture a checkpoint's weights belong to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lungray.configs import check_known_keys
from lungray.models.cnn import CNN, ConvTrunk
from lungray.models.cnn_lstm import CNNLSTM, SEQUENCE_AXES
from lungray.models.ensemble import ARCH as ENSEMBLE_ARCH
from lungray.models.ensemble import Ensemble, EnsembleConfig

__all__ = [
    "ARCHITECTURES",
    "CNN",
    "CNNLSTM",
    "ConvTrunk",
    "Ensemble",
    "EnsembleConfig",
    "ModelConfig",
    "build_model",
    "build_from_architecture",
    "count_parameters",
    "default_config",
]

ARCHITECTURES = ("cnn", "cnn_lstm")
STEM_STRIDES = (1, 2)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters; the trunk fields are shared by both architectures.

    The defaults are sized for training from scratch on a 2-core CPU at 224 px (about
    3,650 training images, 10-15 epochs in under 30 minutes per model): a stride-2 stem
    and four narrow blocks give a 7x7 feature map at 224 px. Both architectures use the
    same trunk defaults, so they are compared on identical convolutional features.
    """

    arch: str
    widths: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_block: int = 2
    stem_stride: int = 2
    dropout: float = 0.5
    fc_hidden: int = 128  # cnn head
    lstm_hidden: int = 128
    lstm_layers: int = 1
    bidirectional: bool = True
    lstm_dropout: float = 0.0  # between stacked LSTM layers, so it needs lstm_layers > 1
    sequence: str = "rows"  # rows | columns | both
    num_classes: int = 2

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the frozen config hashable and comparable.
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHITECTURES}")
        if not self.widths:
            raise ValueError("widths must name at least one conv block")
        if any(not isinstance(width, int) or width < 1 for width in self.widths):
            raise ValueError(f"widths must be positive integers, got {self.widths}")
        if self.stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {STEM_STRIDES}, got {self.stem_stride}")
        if self.sequence not in SEQUENCE_AXES:
            raise ValueError(f"sequence must be one of {tuple(SEQUENCE_AXES)}, got {self.sequence!r}")
        for name in ("dropout", "lstm_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lstm_dropout > 0.0 and self.lstm_layers < 2:
            raise ValueError("lstm_dropout acts between stacked LSTM layers; it needs lstm_layers >= 2")
        for name in ("convs_per_block", "fc_hidden", "lstm_hidden", "lstm_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (widths as a list)."""
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        check_known_keys(cls, data, "model config")
        return cls(**data)


def default_config(arch: str) -> ModelConfig:
    """The default configuration of `arch` (validated)."""
    return ModelConfig(arch=arch)


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model for `config`: (N, 1, H, W) in [0,1] -> (N, num_classes) logits."""
    trunk = {"widths": config.widths, "convs_per_block": config.convs_per_block, "stem_stride": config.stem_stride}
    if config.arch == "cnn":
        return CNN(**trunk, fc_hidden=config.fc_hidden, dropout=config.dropout, num_classes=config.num_classes)
    return CNNLSTM(
        **trunk,
        dropout=config.dropout,
        lstm_hidden=config.lstm_hidden,
        lstm_layers=config.lstm_layers,
        bidirectional=config.bidirectional,
        lstm_dropout=config.lstm_dropout,
        sequence=config.sequence,
        num_classes=config.num_classes,
    )


def build_from_architecture(architecture: dict[str, Any]) -> nn.Module:
    """The model a model.json `architecture` describes: a single model or an ensemble of them."""
    if architecture.get("arch") == ENSEMBLE_ARCH:
        config = EnsembleConfig.from_dict(architecture)
        return Ensemble([build_model(ModelConfig.from_dict(member)) for member in config.members], tta=config.tta)
    return build_model(ModelConfig.from_dict(architecture))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
