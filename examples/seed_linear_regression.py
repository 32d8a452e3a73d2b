"""The seed tutorial's 1-D regression ``ŷ = w·x + b``, trained with manualbp.

The tutorial's four steps of back-propagation, on noisy samples of ``y = 2x - 1``:

1. forward:   ŷ = w·x + b                      (``manualbp.Linear(1, 1)``)
2. loss:      L = (1/N) Σ (ŷ - y)²              (``manualbp.MSELoss()``)
3. backward:  ∂L/∂w = (1/N) Σ 2(ŷ - y)·x,  ∂L/∂b = (1/N) Σ 2(ŷ - y)
              (``loss.backward()`` runs manualbp's hand-written backward)
4. update:    w ← w - η·∂L/∂w,  b ← b - η·∂L/∂b  (``manualbp.optim.SGD``)

The tutorial's per-sample loss is ½(y - ŷ)², whose derivative is ŷ - y; the mean squared
error used here is the average of (ŷ - y)², whose derivative is 2(ŷ - y)/N. The factor only
rescales the learning rate: the chain rule and the four steps are the same.

The first iteration prints each step (and checks the gradients against the tutorial's
formulas); then training runs until ``w`` and ``b`` settle. The script exits 1 unless they end
within five standard errors of the true values (see ``tolerances``) and at the least-squares
solution. Run: ``python examples/seed_linear_regression.py``.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import manualbp
from manualbp.optim import SGD

TRUE_W, TRUE_B = 2.0, -1.0


def make_data(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples ``x ~ U(-2, 2)``, ``y = TRUE_W·x + TRUE_B + noise·N(0, 1)``, shape (n, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen) * 4 - 2
    y = TRUE_W * x + TRUE_B + noise * torch.randn(n, 1, generator=gen)
    return x, y


def tolerances(x: torch.Tensor, noise: float) -> tuple[float, float]:
    """Five standard errors of the least-squares estimates of ``w`` and ``b``.

    Gradient descent on the MSE converges to the least-squares fit, which differs from the
    true (w, b) because of the noise: for ``y = w·x + b + ε`` with ``ε ~ N(0, σ²)`` the
    estimates are Gaussian around the truth with standard errors
    ``SE(w) = σ / sqrt(Σ (x - x̄)²)`` and ``SE(b) = σ · sqrt(1/N + x̄² / Σ (x - x̄)²)``.
    Five of them: a correct implementation misses with probability below 1e-6.
    """
    xs = x.double().flatten()
    n, mean = xs.numel(), xs.mean().item()
    sxx = ((xs - mean) ** 2).sum().item()
    return 5 * noise / math.sqrt(sxx), 5 * noise * math.sqrt(1 / n + mean**2 / sxx)


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """The closed-form fit (float64) that gradient descent should reach."""
    a = torch.cat([x.double(), torch.ones_like(x, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(a, y.double()).solution.flatten()
    return sol[0].item(), sol[1].item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="number of samples")
    parser.add_argument("--noise", type=float, default=0.1, help="noise standard deviation")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate η")
    parser.add_argument("--steps", type=int, default=200, help="full-batch gradient steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and initial w, b")
    args = parser.parse_args(argv)

    x, y = make_data(args.samples, args.noise, args.seed)
    torch.manual_seed(args.seed)
    model = manualbp.Linear(1, 1)  # ŷ = w·x + b, with a hand-written backward
    loss_fn = manualbp.MSELoss()
    opt = SGD(model.parameters(), lr=args.lr)
    w, b = model.weight, model.bias
    print(f"data: {args.samples} samples of y = {TRUE_W}·x + ({TRUE_B}) + noise (σ = {args.noise})")
    print(f"initial: w = {w.item():+.6f}, b = {b.item():+.6f}\n")

    print("iteration 1, step by step")
    y_hat = model(x)  # 1. forward
    first = ", ".join(f"{v:.4f}" for v in y_hat[:3].flatten().tolist())
    print(f"  1. forward   ŷ = w·x + b           ŷ[:3] = [{first}, ...]")
    loss = loss_fn(y_hat, y)  # 2. loss
    print(f"  2. loss      L = mean((ŷ - y)²)    L = {loss.item():.6f}")
    opt.zero_grad()
    loss.backward()  # 3. backward: manualbp's MSELossFunction, then LinearFunction
    r = (y_hat - y).detach()
    by_hand_w = (2 * r * x).mean().item()  # the chain rule, written out as in the tutorial
    by_hand_b = (2 * r).mean().item()
    print(
        f"  3. backward  ∂L/∂w = {w.grad.item():+.6f}   (by hand: mean(2(ŷ-y)·x) = "
        f"{by_hand_w:+.6f})"
    )
    print(
        f"               ∂L/∂b = {b.grad.item():+.6f}   (by hand: mean(2(ŷ-y))   = "
        f"{by_hand_b:+.6f})"
    )
    opt.step()  # 4. update
    print(
        f"  4. update    w ← w - η·∂L/∂w = {w.item():+.6f},  b ← b - η·∂L/∂b = "
        f"{b.item():+.6f}   (η = {args.lr})\n"
    )
    grads_ok = math.isclose(w.grad.item(), by_hand_w, rel_tol=1e-5, abs_tol=1e-6) and (
        math.isclose(b.grad.item(), by_hand_b, rel_tol=1e-5, abs_tol=1e-6)
    )

    report = max(args.steps // 6, 1)
    for step in range(2, args.steps + 1):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if step % report == 0 or step == args.steps:
            print(
                f"  step {step:4d}: loss {loss.item():.6f}   w = {w.item():+.6f}   "
                f"b = {b.item():+.6f}"
            )

    w_fit, b_fit = w.item(), b.item()
    w_ls, b_ls = least_squares(x, y)
    tol_w, tol_b = tolerances(x, args.noise)
    print(f"\nfinal: w = {w_fit:.6f}, b = {b_fit:.6f}")
    print(f"least squares: w = {w_ls:.6f}, b = {b_ls:.6f}")
    print(
        f"true: w = {TRUE_W}, b = {TRUE_B} (tolerance: 5 standard errors, "
        f"±{tol_w:.4f} for w, ±{tol_b:.4f} for b)"
    )
    # Float32 training reaches the float64 least-squares fit to ~1e-6; 1e-4 means "converged".
    at_optimum = abs(w_fit - w_ls) < 1e-4 and abs(b_fit - b_ls) < 1e-4
    near_truth = abs(w_fit - TRUE_W) <= tol_w and abs(b_fit - TRUE_B) <= tol_b
    if grads_ok and at_optimum and near_truth:
        print("converged: w and b match the true values")
        return 0
    why = [
        *([] if grads_ok else ["the first gradients differ from the hand formulas"]),
        *([] if at_optimum else ["training did not reach the least-squares fit"]),
        *([] if near_truth else ["w, b are not within tolerance of the true values"]),
    ]
    print("NOT converged: " + "; ".join(why), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
