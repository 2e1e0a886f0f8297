"""A PyTorch baseline of the authors' MNIST PixelVAE, for speed comparisons only.

The gated "without upsampling" model of configs/mnist.py:gated_noup (a 7x7 gated
layer, 12 gated 5x5 layers of 16 channels with z as a bias in every gate, two gated
1x1 layers, the appendix E.1 encoder, 16-dim z, weight norm, Adam with element-wise
clipping at 1.0), written the way PixelCNN code usually is: full kernels times a zero
mask, weight norm recomputed in every call, one process with PyTorch's own threads.
It trains on random binary 28x28 batches (data loading is not what it measures).

    pip install torch==2.13.0   # CPU build; not a dependency of pvae_jax
    python results/speed/torch_reference.py --steps=30 --output=torch.json
"""

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(kh, kw, mask_type):
    """Rows above, and the columns left of the centre in the centre row (plus the
    centre for mask 'B')."""
    m = torch.zeros(kh, kw)
    m[: kh // 2] = 1
    m[kh // 2, : kw // 2 + (mask_type == "B")] = 1
    return m


class MaskedWNConv(nn.Module):
    def __init__(self, cin, cout, kh, kw, mask):
        super().__init__()
        self.v = nn.Parameter(torch.randn(cout, cin, kh, kw) * (cin * kh * kw) ** -0.5)
        self.g = nn.Parameter(torch.ones(cout))
        self.b = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mask", mask.expand(cout, cin, kh, kw).clone())
        self.pad = (kh // 2, kw // 2)

    def forward(self, x):
        v = self.v * self.mask
        w = self.g[:, None, None, None] * v / v.flatten(1).norm(dim=1)[:, None, None, None]
        return F.conv2d(x, w, self.b, padding=self.pad)


def gate(x):
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """Vertical stack (rows above, full k x k kernel with its lower half masked, then a
    one-row shift), horizontal stack (1 x k, masked), z bias in both gates."""

    def __init__(self, cin, f, k, mask_type, zdim, residual):
        super().__init__()
        vmask = torch.zeros(k, k)
        vmask[: k // 2 + 1] = 1
        self.vert = MaskedWNConv(cin, 2 * f, k, k, vmask)
        self.horiz = MaskedWNConv(cin, 2 * f, 1, k, causal_mask(1, k, mask_type)[None, 0])
        self.v2h = nn.Conv2d(2 * f, 2 * f, 1)
        self.hout = MaskedWNConv(f, f, 1, 1, torch.ones(1, 1))
        self.zv, self.zh = nn.Linear(zdim, 2 * f), nn.Linear(zdim, 2 * f)
        self.residual = residual

    def forward(self, v, h, z):
        v_pre = self.vert(v) + self.zv(z)[:, :, None, None]
        shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]
        h_pre = self.horiz(h) + self.v2h(shifted) + self.zh(z)[:, :, None, None]
        h_out = self.hout(gate(h_pre))
        return gate(v_pre), h_out + h if self.residual else h_out


class Model(nn.Module):
    def __init__(self, f=16, zdim=16, enc=(32, 64), layers=12):
        super().__init__()
        f1, f2 = enc
        spec = [(1, f1, 1), (f1, f1, 2), (f1, f1, 1), (f1, f2, 2), (f2, f2, 1), (f2, f2, 2),
                (f2, f2, 1), (f2, f2, 1), (f2, f2, 1)]
        self.enc = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for i, o, s in spec)
        self.enc_out = nn.Linear(4 * 4 * f2, 2 * zdim)
        self.first = GatedLayer(1, f, 7, "A", zdim, residual=False)
        self.layers = nn.ModuleList(GatedLayer(f, f, 5, "B", zdim, True) for _ in range(layers))
        self.head = nn.ModuleList(MaskedWNConv(f, 2 * f, 1, 1, torch.ones(1, 1))
                                  for _ in range(2))
        self.head_z = nn.ModuleList(nn.Linear(zdim, 2 * f) for _ in range(2))
        self.out = MaskedWNConv(f, 1, 1, 1, torch.ones(1, 1))

    def forward(self, x):
        h = x * 2.0 - 1.0
        for conv in self.enc:
            h = F.relu(conv(h))
        mean, log_std = self.enc_out(h.flatten(1)).chunk(2, dim=1)
        z = mean + log_std.exp() * torch.randn_like(mean)
        v, hs = self.first(x * 2.0 - 1.0, x * 2.0 - 1.0, z)
        for layer in self.layers:
            v, hs = layer(v, hs, z)
        for conv, lin in zip(self.head, self.head_z, strict=True):
            hs = gate(conv(hs) + lin(z)[:, :, None, None])
        logits = self.out(hs)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
        kl = 0.5 * (mean**2 + (2 * log_std).exp() - 2 * log_std - 1).sum(1)
        return (recon + kl).mean()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = (torch.rand(args.batch, 1, 28, 28) < 0.13).float()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    result = {
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "batch_size": args.batch, "num_steps": args.steps,
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_images_per_sec": args.batch * len(times) / sum(times),
        "train_images_per_sec_median_step": args.batch / times[len(times) // 2],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss_last": float(loss),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
