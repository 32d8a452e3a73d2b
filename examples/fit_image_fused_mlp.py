"""Fit a 2-D colour image with a coordinate network: ``manualbp.FusedMLP`` next to native.

A coordinate network maps a pixel's position ``(u, v)`` to its colour. The image is
procedural (rings and a checker pattern, generated here), the inputs are Fourier features of
the position (``sin``/``cos`` of ``2^k pi u`` and ``2^k pi v``: without them a small MLP only
learns a blur), and the network is narrow and deep: 4 hidden layers of 64 ReLU units,
exactly the shape the fused MLP is for.

Both models start from the same weights: the native one is ``mlp.to_sequential()``, an
``nn.Sequential`` of ``nn.Linear`` + ``nn.ReLU`` modules with copies of the FusedMLP's
parameters. Each trains with its own ``torch.optim.Adam`` on the MSE over every pixel; the
losses are printed side by side (they agree to float32 rounding; a wrong gradient would show
at the first step) and a PNG of the target, both fits and the loss curves is saved.

By default the reference path runs (plain torch ops, the hand-derived backward; < 30 s on a
CPU). ``--backend triton`` runs the fused Triton kernels: on a GPU with ``--device cuda``,
or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, slow: use ``--size 32``).

Run: ``python examples/fit_image_fused_mlp.py [--steps 250] [--out fit.png]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

import manualbp


def make_image(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coords, rgb)``: pixel positions in [-1, 1]^2, shape (size*size, 2), and the colour of
    each, shape (size*size, 3) in [0, 1]."""
    axis = torch.linspace(-1, 1, size)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    r = torch.sqrt(u * u + v * v)
    rings = 0.5 + 0.5 * torch.cos(12 * math.pi * r)
    checker = ((torch.floor(4 * (u + 1)) + torch.floor(4 * (v + 1))) % 2).float()
    rgb = torch.stack([rings, 0.3 + 0.7 * checker * (r < 0.8), 0.5 + 0.5 * u * v], dim=-1)
    return torch.stack([u, v], dim=-1).reshape(-1, 2), rgb.reshape(-1, 3)


def fourier_features(coords: torch.Tensor, octaves: int) -> torch.Tensor:
    """``[u, v, sin(2^k pi u), cos(2^k pi u), sin(2^k pi v), cos(2^k pi v) for k < octaves]``."""
    freqs = math.pi * 2.0 ** torch.arange(octaves, dtype=coords.dtype)
    angles = (coords[:, :, None] * freqs).reshape(coords.shape[0], -1)
    return torch.cat([coords, torch.sin(angles), torch.cos(angles)], dim=1)


def train(model, x, y, steps: int, lr: float, backend: str) -> tuple[list[float], float]:
    """Adam on the mean squared error over every pixel; the losses and the seconds taken."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    with manualbp.use_backend(backend):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, time.perf_counter() - start


def save_plot(path: str, size: int, target, fits, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    images = [("target", target), *fits]
    for ax, (title, img) in zip(axes[:3], images, strict=True):
        ax.imshow(img.reshape(size, size, 3).clamp(0, 1).numpy(), origin="lower")
        ax.set_title(title)
        ax.axis("off")
    for label, losses in curves:
        axes[3].semilogy(losses, label=label)
    axes[3].set_xlabel("step")
    axes[3].set_ylabel("MSE")
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--octaves", type=int, default=6, help="Fourier feature octaves")
    parser.add_argument("--backend", default="reference", choices=["reference", "triton"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    # One CPU thread: at these sizes OpenMP's hand-offs cost more than they save, and on a busy
    # machine (more threads than free cores) they cost many times the work itself.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="fit_image_fused_mlp.png", help="PNG to write")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    coords, rgb = make_image(args.size)
    x = fourier_features(coords, args.octaves).to(args.device)
    y = rgb.to(args.device)
    mlp = manualbp.FusedMLP(x.shape[1], 64, 3, 4, "relu", "sigmoid", device=args.device)
    native = mlp.to_sequential()  # the same weights, in nn.Linear / nn.ReLU modules
    print(f"{args.size}x{args.size} pixels, {x.shape[1]} input features, {mlp}")

    fused_losses, fused_s = train(mlp, x, y, args.steps, args.lr, args.backend)
    native_losses, native_s = train(native, x, y, args.steps, args.lr, "reference")
    print(f"{'step':>6} {'FusedMLP':>12} {'native':>12}")
    for step in sorted({*range(0, args.steps, max(1, args.steps // 10)), args.steps - 1}):
        print(f"{step:>6} {fused_losses[step]:>12.6f} {native_losses[step]:>12.6f}")
    print(f"time: FusedMLP ({args.backend}) {fused_s:.1f} s, native {native_s:.1f} s")

    with torch.no_grad():
        fits = [(f"FusedMLP ({args.backend})", mlp(x).cpu()), ("native", native(x).cpu())]
    save_plot(args.out, args.size, rgb, fits, [("FusedMLP", fused_losses),
                                               ("native", native_losses)])  # fmt: skip
    print(f"saved {args.out}")
    # Same start, same data, same optimiser: the first loss is the same forward pass, and the
    # curves only drift apart by rounding.
    first_ok = math.isclose(fused_losses[0], native_losses[0], rel_tol=1e-5)
    final_ok = math.isclose(fused_losses[-1], native_losses[-1], rel_tol=0.2, abs_tol=1e-4)
    return 0 if first_ok and final_ok else 1


if __name__ == "__main__":
    sys.exit(main())
