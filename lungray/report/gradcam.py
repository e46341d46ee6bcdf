"""Grad-CAM heat maps for both screening architectures, and their overlay on the radiograph.

Both models read the same `ConvTrunk`; the CNN pools its map and the CNN-LSTM reads it row
by row, so the trunk's last activation is where either model's spatial evidence lives and
one hook serves both. The map is weighted by the gradient of the abnormal-vs-normal logit
difference (the log-odds that the softmax probability depends on), so the heat shows
evidence *for* "abnormal"; evidence for "normal" is clipped away, as in Selvaraju et al.
(2017). The comparison report and the screening job's `--explain` both use this module.
An ensemble is explained by its first member on the unwarped image (one trunk, one map).
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lungray.models import Ensemble

ABNORMAL, NORMAL = 1, 0
#: Perceptually ordered and readable over grey, unlike "jet".
COLORMAP = "turbo"


def target_layer(model: nn.Module) -> nn.Module:
    """The trunk's last activation: the finest map that has seen every convolution.

    It sits before the trunk's final max-pool, so the heat map has twice the resolution of
    the map the heads read, and every value in the pooled map comes from it.
    """
    trunk = getattr(model, "trunk", None)
    if trunk is None:
        raise TypeError(f"{type(model).__name__} has no `trunk`; Grad-CAM needs a lungray screening model")
    activations = [module for module in trunk.modules() if isinstance(module, nn.ReLU)]
    if not activations:
        raise TypeError("the model's trunk has no ReLU activation to explain")
    return activations[-1]


def gradcam(model: nn.Module, image: torch.Tensor) -> np.ndarray:
    """Grad-CAM of "abnormal" for one image: float32 (H, W) in [0, 1], 1 at the peak.

    `image` is the model input, (1, 1, H, W) floats in [0, 1]. The model must be in eval
    mode (batch-norm statistics and dropout as at scoring time); its parameters and
    gradients are left untouched. The map is all zeros when nothing in the image argues
    for "abnormal". Works inside `torch.inference_mode()` (screening actors score there).
    """
    if image.ndim != 4 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected one image of shape (1, 1, H, W), got {tuple(image.shape)}")
    if model.training:
        raise ValueError("Grad-CAM explains the scoring model: call model.eval() first")
    if isinstance(model, Ensemble):
        model = model.explained
    captured: dict[str, torch.Tensor] = {}
    hook = target_layer(model).register_forward_hook(lambda module, inputs, output: captured.update(maps=output))
    device = next(model.parameters()).device
    try:
        # cuDNN's LSTM has no backward pass in eval mode; the native kernels do.
        with torch.inference_mode(False), torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            inputs = image.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
            logits = model(inputs)
            log_odds = logits[0, ABNORMAL] - logits[0, NORMAL]
            (gradients,) = torch.autograd.grad(log_odds, captured["maps"])
    finally:
        hook.remove()
    channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((channel_weights * captured["maps"].detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    if peak > 0:
        cam = cam / peak
    return cam.cpu().numpy().astype(np.float32)


def overlay_png(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> bytes:
    """PNG of the greyscale `image` (uint8, H x W) with `heat` ([0, 1], H x W) laid over it.

    The colour's opacity grows with the heat (up to `alpha`), so the radiograph stays
    visible wherever the model found no evidence.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} of shape {image.shape}")
    if heat.shape != image.shape:
        raise ValueError(f"heat map shape {heat.shape} differs from the image's {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    heat = np.clip(heat.astype(np.float64), 0.0, 1.0)
    colour = matplotlib.colormaps[COLORMAP](heat)[..., :3]
    grey = np.repeat(image[..., None] / 255.0, 3, axis=2)
    opacity = alpha * heat[..., None]
    blended = (1.0 - opacity) * grey + opacity * colour
    buffer = io.BytesIO()
    Image.fromarray(np.rint(blended * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
