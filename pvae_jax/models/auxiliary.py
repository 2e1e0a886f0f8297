"""PixelCNNs with auxiliary variables (Kolesnikov & Lampert, ICML 2017).

An auxiliary image x^ = f(x) is modelled jointly with x as p(x, x^) = p(x | x^) p(x^).
Since x^ is a function of x, -log p(x, x^) is an upper bound on -log p(x), and the
objective is a plain sum of the factors' NLLs (their parameters never interact).

* ``GrayscalePixelCNN``: x^ is the 4-bit grayscale image. p(x^) is a PixelCNN++ with
  a 16-way softmax per pixel; p(x | x^) a PixelCNN++ with the discretized logistic
  mixture, every gated resnet biased by an embedding f_w(x^).
* ``PyramidPixelCNN``: x^ is the image at half resolution, recursively: the lowest
  scale is a plain PixelCNN++, every finer scale a light one-stage PixelCNN++
  conditioned on a deeper embedding of the scale below.

Both follow the models' contract: ``apply(variables, x, train=...)`` returns
per-example nats ``loss`` (the bound), ``recon`` (the same: nothing is sampled),
``kl`` (zeros) and one ``nll_<factor>`` per factor, summing to ``loss``;
``method='conditional_log_prob'`` gives log p(x_d | x_<d, x^) of the finest image
for every sub-pixel, with ``latents`` = x^ held fixed (None: x^ = f(x));
``method='posterior_sample'`` returns f(x). Factor bits/dim as the paper reports
them come from ``bits_per_dim``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pvae_jax import distributions
from pvae_jax.nn import pixelcnnpp as pp

GRAY_LEVELS = 16


def scale_levels(x, num_levels: int) -> jax.Array:
    """Integer levels [0, L) -> float32 in [-1, 1], as the mixture likelihood bins them."""
    return jnp.asarray(x).astype(jnp.float32) * (2.0 / (num_levels - 1)) - 1.0


def grayscale_4bit(x_BxHxWx3) -> jax.Array:
    """The auxiliary image of the Grayscale PixelCNN: int32 [B, H, W, 1] in [0, 16).

    Luma by the ITU-R BT.601 weights (the paper does not say which), rounded to
    8 bits, then its 4 high bits.
    """
    x = jnp.asarray(x_BxHxWx3).astype(jnp.int32)
    gray = (299 * x[..., 0] + 587 * x[..., 1] + 114 * x[..., 2] + 500) // 1000
    return (gray // (256 // GRAY_LEVELS))[..., None]


def downsample2(x_BxHxWxC) -> jax.Array:
    """Area (2x2 mean) downsampling of integer images, rounded half up: int32."""
    x = jnp.asarray(x_BxHxWxC).astype(jnp.int32)
    B, H, W, C = x.shape
    block_sum = x.reshape(B, H // 2, 2, W // 2, 2, C).sum(axis=(2, 4))
    return (block_sum + 2) // 4


def mixture_log_prob(params_BxHxWxP, x_BxHxWxC, num_mixtures: int, num_levels: int):
    return distributions.logistic_mixture_log_prob(params_BxHxWxP, x_BxHxWxC, num_mixtures,
                                                   num_levels)


def _nll(log_prob_BxHxWxC) -> jax.Array:
    return -log_prob_BxHxWxC.sum(axis=(1, 2, 3))


def bits_per_dim(out: dict, image_shape) -> dict:
    """Bits/dim of the bound and of each factor, averaged over the batch.

    Every factor is counted over the dims of x (H*W*C), so the factors add up to the
    total, as the paper splits CIFAR-10's bound into grayscale and colour parts. A
    pyramid's output (``nll_scale_<k>``) also gets, per scale k, ``scale_<k>_own``
    (the factor over its own dims: the conditional's bits/dim) and
    ``resolution_<h>`` (the bound of the pyramid up to that scale over the dims at
    that scale: the paper's table of bits/dim per resolution).

    Args:
      out: the model's output dict (per-example nats).
      image_shape: (H, W, C) of x.

    Returns:
      ``{'bits_per_dim': ..., 'bits_per_dim/<name>': ...}`` of Python floats.
    """
    H, W, C = image_shape
    ln2 = math.log(2.0)
    mean = {k: float(jnp.mean(v)) for k, v in out.items() if k == "loss" or k.startswith("nll_")}
    result = {"bits_per_dim": mean["loss"] / (H * W * C * ln2)}
    for key, nats in mean.items():
        if key.startswith("nll_"):
            result[f"bits_per_dim/{key[4:]}"] = nats / (H * W * C * ln2)
    num_scales = sum(k.startswith("nll_scale_") for k in mean)
    total = 0.0
    for k in range(num_scales):
        side = 2 ** (num_scales - 1 - k)
        dims = (H // side) * (W // side) * C * ln2
        total += mean[f"nll_scale_{k}"]
        result[f"bits_per_dim/scale_{k}_own"] = mean[f"nll_scale_{k}"] / dims
        result[f"bits_per_dim/resolution_{H // side}"] = total / dims
    return result


def _check_image(name, image_hw, channels, num_levels, need_channels):
    if channels != need_channels:
        raise ValueError(f"{name} models {need_channels}-channel images, got {channels} "
                         "channels; pick an RGB dataset.")
    if num_levels != 256:
        raise ValueError(f"{name} needs 256-level images, got num_levels={num_levels}; set "
                         "data.binarize='none'.")


class GrayscalePixelCNN(nn.Module):
    """p(x, x^) = p(x | x^) p(x^) with x^ the 4-bit grayscale image.

    Attributes:
      image_hw: (H, W).
      channels: must be 3.
      num_levels: must be 256.
      features, num_resnet, num_stages, dropout_rate: the PixelCNN++ of p(x | x^).
      aux_features, aux_num_resnet: the PixelCNN++ of p(x^) (same stages).
      embed_features, embed_num_blocks: f_w(x^), full resolution throughout.
      num_mixtures: logistic mixture components.
    """

    image_hw: tuple[int, int]
    channels: int = 3
    num_levels: int = 256
    features: int = 160
    num_resnet: int = 5
    num_stages: int = 3
    dropout_rate: float = 0.5
    aux_features: int = 160
    aux_num_resnet: int = 5
    embed_features: int = 160
    embed_num_blocks: int = 5
    num_mixtures: int = 10

    def setup(self):
        _check_image("GrayscalePixelCNN", self.image_hw, self.channels, self.num_levels, 3)
        self.aux_net = pp.PixelCNNPP(self.aux_features, self.aux_num_resnet, GRAY_LEVELS,
                                     self.num_stages, self.dropout_rate)
        self.embed_net = pp.EmbeddingNet(self.embed_features, self.embed_num_blocks,
                                         dropout_rate=self.dropout_rate)
        num_params = distributions.num_mixture_params(self.channels, self.num_mixtures)
        self.cond_net = pp.PixelCNNPP(self.features, self.num_resnet, num_params,
                                      self.num_stages, self.dropout_rate)

    def __call__(self, x_BxHxWxC, train: bool = False, kl_weight=1.0):
        del kl_weight  # No latents.
        x_hat = grayscale_4bit(x_BxHxWxC)
        nll_gray = _nll(self.aux_log_prob(x_hat, train))
        nll_color = _nll(self.conditional_log_prob(x_BxHxWxC, x_hat, train))
        loss = nll_gray + nll_color
        return {"loss": loss, "recon": loss, "kl": jnp.zeros_like(loss),
                "nll_grayscale": nll_gray, "nll_color": nll_color}

    def posterior_sample(self, x_BxHxWxC):
        """x^ = f(x): the grayscale image (deterministic)."""
        return grayscale_4bit(x_BxHxWxC)

    def aux_logits(self, x_hat_BxHxWx1, train: bool = False):
        """Logits ``[B, H, W, 16]`` of p(x^_ij | earlier pixels of x^)."""
        return self.aux_net(scale_levels(x_hat_BxHxWx1, GRAY_LEVELS), None, train)

    def aux_log_prob(self, x_hat_BxHxWx1, train: bool = False):
        """log p(x^_d | x^_<d), ``[B, H, W, 1]``."""
        logits = self.aux_logits(x_hat_BxHxWx1, train)[..., None, :]
        return distributions.categorical_log_prob(logits, x_hat_BxHxWx1)

    def embed(self, x_hat_BxHxWx1, train: bool = False):
        """The conditioning maps of p(x | x^), one per stage: computed once per image."""
        h = self.embed_net(scale_levels(x_hat_BxHxWx1, GRAY_LEVELS), train)
        return pp.pool_pyramid(h, self.num_stages)

    def mixture_params(self, x_BxHxWxC, cond_maps, train: bool = False):
        """Mixture parameters ``[B, H, W, P]`` of p(x_ij | earlier pixels, x^)."""
        return self.cond_net(scale_levels(x_BxHxWxC, self.num_levels), cond_maps, train)

    def conditional_log_prob(self, x_BxHxWxC, latents=None, train: bool = False):
        """log p(x_d | x_<d, x^) per sub-pixel, ``[B, H, W, C]``; x^ = latents or f(x)."""
        x_hat = grayscale_4bit(x_BxHxWxC) if latents is None else latents
        params = self.mixture_params(x_BxHxWxC, self.embed(x_hat, train), train)
        return mixture_log_prob(params, x_BxHxWxC, self.num_mixtures, self.num_levels)


class PyramidPixelCNN(nn.Module):
    """p(x_S) = p(x_1) prod_{k>1} p(x_k | x_{k-1}): x_{k-1} is x_k at half resolution.

    Scale 0 is the coarsest (``image_hw / 2 ** (num_scales - 1)``), scale
    ``num_scales - 1`` the image itself.

    Attributes:
      image_hw: (H, W); both must divide by 2 ** (num_scales - 1) and the coarsest
        scale by 2 ** (base_num_stages - 1).
      channels, num_levels: image channels and levels.
      num_scales: resolutions in the pyramid (>= 2).
      features: channels of every PixelCNN++ and embedding.
      base_num_resnet, base_num_stages: the plain PixelCNN++ of the coarsest scale.
      scale_num_resnet: gated resnets per pass of each finer scale's light one-stage
        PixelCNN++.
      embed_num_blocks, embed_down_after, embed_up_after: each finer scale's
        embedding net of the scale below; it must upsample once more than it
        downsamples (the paper: down after block 3, up after blocks 8 and 12 of 15,
        our reading of its extracted text).
      dropout_rate, num_mixtures: as in PixelCNN++.
    """

    image_hw: tuple[int, int]
    channels: int = 3
    num_levels: int = 256
    num_scales: int = 5
    features: int = 100
    base_num_resnet: int = 5
    base_num_stages: int = 3
    scale_num_resnet: int = 2
    embed_num_blocks: int = 15
    embed_down_after: tuple[int, ...] = (3,)
    embed_up_after: tuple[int, ...] = (8, 12)
    dropout_rate: float = 0.5
    num_mixtures: int = 10

    def setup(self):
        self._check()
        num_params = distributions.num_mixture_params(self.channels, self.num_mixtures)
        self.base_net = pp.PixelCNNPP(self.features, self.base_num_resnet, num_params,
                                      self.base_num_stages, self.dropout_rate)
        self.embed_nets = [
            pp.EmbeddingNet(self.features, self.embed_num_blocks, tuple(self.embed_down_after),
                            tuple(self.embed_up_after), self.dropout_rate)
            for _ in range(self.num_scales - 1)]
        self.scale_nets = [
            pp.PixelCNNPP(self.features, self.scale_num_resnet, num_params, 1, self.dropout_rate)
            for _ in range(self.num_scales - 1)]

    def _check(self):
        if self.num_scales < 2:
            raise ValueError(f"num_scales must be >= 2, got {self.num_scales}; a single "
                             "scale is a plain PixelCNN++.")
        factor = 2 ** (self.num_scales - 1)
        H, W = self.image_hw
        if H % factor or W % factor:
            raise ValueError(f"image size {self.image_hw} must divide by 2 ** (num_scales - 1)"
                             f" = {factor}; lower model.num_scales or change data.image_size.")
        base = 2 ** (self.base_num_stages - 1)
        if (H // factor) % base or (W // factor) % base:
            raise ValueError(f"the coarsest scale {(H // factor, W // factor)} must divide by "
                             f"2 ** (base_num_stages - 1) = {base}; lower model.base_num_stages.")
        if len(self.embed_up_after) != len(self.embed_down_after) + 1:
            raise ValueError(
                f"the embedding must upsample once more than it downsamples, to reach the "
                f"finer scale; got embed_down_after={tuple(self.embed_down_after)} and "
                f"embed_up_after={tuple(self.embed_up_after)}.")
        blocks = set(self.embed_down_after) | set(self.embed_up_after)
        if blocks and (min(blocks) < 1 or max(blocks) > self.embed_num_blocks):
            raise ValueError(f"embed_down_after/embed_up_after name blocks 1.."
                             f"{self.embed_num_blocks} (embed_num_blocks), got {sorted(blocks)}.")

    def __call__(self, x_BxHxWxC, train: bool = False, kl_weight=1.0):
        del kl_weight  # No latents.
        scales = self.pyramid(x_BxHxWxC)
        out = {"nll_scale_0": _nll(self.base_log_prob(scales[0], train))}
        for k in range(1, self.num_scales):
            emb = self.embed(k, scales[k - 1], train)
            out[f"nll_scale_{k}"] = _nll(self.scale_log_prob(k, scales[k], emb, train))
        loss = sum(out.values())
        return {"loss": loss, "recon": loss, "kl": jnp.zeros_like(loss), **out}

    def pyramid(self, x_BxHxWxC) -> list[jax.Array]:
        """The image at every scale, coarsest first (int32)."""
        scales = [jnp.asarray(x_BxHxWxC).astype(jnp.int32)]
        for _ in range(self.num_scales - 1):
            scales.insert(0, downsample2(scales[0]))
        return scales

    def posterior_sample(self, x_BxHxWxC):
        """x^ = f(x): the image at half resolution."""
        return downsample2(x_BxHxWxC)

    def base_params(self, x0_BxhxwxC, train: bool = False):
        """Mixture parameters of the coarsest scale's plain PixelCNN++."""
        return self.base_net(scale_levels(x0_BxhxwxC, self.num_levels), None, train)

    def base_log_prob(self, x0_BxhxwxC, train: bool = False):
        """log p(x_0 sub-pixel | earlier ones) at the coarsest scale."""
        return mixture_log_prob(self.base_params(x0_BxhxwxC, train), x0_BxhxwxC,
                                self.num_mixtures, self.num_levels)

    def embed(self, k: int, x_lower, train: bool = False):
        """f_w of scale k (>= 1) from the scale below: ``[B, h_k, w_k, features]``.

        ``x_lower`` holds integer levels; float input is taken as already scaled to
        [-1, 1] (for gradients in tests).
        """
        x = x_lower if jnp.issubdtype(x_lower.dtype, jnp.floating) else scale_levels(
            x_lower, self.num_levels)
        return self.embed_nets[k - 1](x, train)

    def scale_params(self, k: int, x_k, embedding, train: bool = False):
        """Mixture parameters of scale k given its embedding: x_{k-1} enters only here."""
        return self.scale_nets[k - 1](scale_levels(x_k, self.num_levels), (embedding,), train)

    def scale_log_prob(self, k: int, x_k, embedding, train: bool = False):
        """log p(x_k sub-pixel | earlier ones, f_w(x_{k-1})) per sub-pixel."""
        return mixture_log_prob(self.scale_params(k, x_k, embedding, train), x_k,
                                self.num_mixtures, self.num_levels)

    def conditional_log_prob(self, x_BxHxWxC, latents=None, train: bool = False):
        """log p(x_d | x_<d, x^) of the finest scale, ``[B, H, W, C]``; x^ = latents
        (the half-resolution image) or f(x)."""
        k = self.num_scales - 1
        x_lower = downsample2(x_BxHxWxC) if latents is None else latents
        return self.scale_log_prob(k, x_BxHxWxC, self.embed(k, x_lower, train), train)


class PixelCNNPlusPlus(nn.Module):
    """A plain single-scale PixelCNN++ p(x): the baseline the pyramid is compared with.

    Attributes:
      image_hw, channels, num_levels: the images.
      features, num_resnet, num_stages, dropout_rate, num_mixtures: as in PixelCNN++.
    """

    image_hw: tuple[int, int]
    channels: int = 3
    num_levels: int = 256
    features: int = 160
    num_resnet: int = 5
    num_stages: int = 3
    dropout_rate: float = 0.5
    num_mixtures: int = 10

    def setup(self):
        num_params = distributions.num_mixture_params(self.channels, self.num_mixtures)
        self.net = pp.PixelCNNPP(self.features, self.num_resnet, num_params, self.num_stages,
                                 self.dropout_rate)

    def __call__(self, x_BxHxWxC, train: bool = False, kl_weight=1.0):
        del kl_weight  # No latents.
        nll = _nll(self.conditional_log_prob(x_BxHxWxC, None, train))
        return {"loss": nll, "recon": nll, "kl": jnp.zeros_like(nll)}

    def mixture_params(self, x_BxHxWxC, train: bool = False):
        """Mixture parameters ``[B, H, W, P]`` of p(x_ij | earlier pixels)."""
        return self.net(scale_levels(x_BxHxWxC, self.num_levels), None, train)

    def conditional_log_prob(self, x_BxHxWxC, latents=None, train: bool = False):
        """log p(x_d | x_<d) per sub-pixel, ``[B, H, W, C]``."""
        del latents
        return mixture_log_prob(self.mixture_params(x_BxHxWxC, train), x_BxHxWxC,
                                self.num_mixtures, self.num_levels)

    def posterior_sample(self, x_BxHxWxC):
        del x_BxHxWxC
        return None


def numpy_init(model: nn.Module, *inputs, seed: int = 0) -> dict:
    """Variables drawn on the host: kernels N(0, 1/fan_in), biases 0.

    ``model.init`` compiles one random initialiser per parameter, which takes XLA:CPU
    tens of seconds for these many-layered nets; tests and benchmarks that need
    only some valid parameters use this instead (shapes from ``jax.eval_shape`` of
    ``model.init(key, *inputs)``).
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1])
        return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    return jax.tree.map(draw, shapes)


AUXILIARY_MODELS = {"grayscale_pixelcnn": GrayscalePixelCNN, "pyramid_pixelcnn": PyramidPixelCNN,
                    "pixelcnn_pp": PixelCNNPlusPlus}


def build(model_config, data_shape, num_levels: int = 256) -> nn.Module:
    """Builds ``model_config.name`` (a key of ``AUXILIARY_MODELS``) for (H, W, C) images.

    Raises:
      ValueError: an image shape or setting the model cannot take; the message names
        the config field.
    """
    H, W, C = data_shape
    cfg = model_config
    common = dict(image_hw=(H, W), channels=C, num_levels=num_levels, num_mixtures=cfg.num_mixtures,
                  dropout_rate=cfg.dropout_rate, features=cfg.features)
    if cfg.name == "grayscale_pixelcnn":
        model = GrayscalePixelCNN(
            num_resnet=cfg.num_resnet, num_stages=cfg.num_stages,
            aux_features=cfg.aux_features, aux_num_resnet=cfg.aux_num_resnet,
            embed_features=cfg.embed_features, embed_num_blocks=cfg.embed_num_blocks, **common)
        _check_image("grayscale_pixelcnn", (H, W), C, num_levels, 3)
        pp._check_sizes((H, W), cfg.num_stages)
        return model
    if cfg.name == "pyramid_pixelcnn":
        model = PyramidPixelCNN(
            num_scales=cfg.num_scales, base_num_resnet=cfg.base_num_resnet,
            base_num_stages=cfg.base_num_stages, scale_num_resnet=cfg.scale_num_resnet,
            embed_num_blocks=cfg.embed_num_blocks,
            embed_down_after=tuple(cfg.embed_down_after),
            embed_up_after=tuple(cfg.embed_up_after), **common)
        model._check()
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        return model
    if cfg.name == "pixelcnn_pp":
        pp._check_sizes((H, W), cfg.num_stages)
        return PixelCNNPlusPlus(num_resnet=cfg.num_resnet, num_stages=cfg.num_stages, **common)
    raise ValueError(f"model.name must be one of {tuple(AUXILIARY_MODELS)}, got {cfg.name!r}")
