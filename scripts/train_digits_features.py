"""Train ``DigitsFeatureNet``, the feature network of FID-digits, and write its weights as package data.

Deterministic: fixed split (``digits_split``), seeded initialisation, batch order and one-pixel shifts (the only
augmentation), deterministic algorithms, one CPU thread. About 30 s on one CPU core.

    python scripts/train_digits_features.py [--out kve_lightning/assets/digits_features.safetensors]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kve_lightning.metrics import DIGITS_WEIGHTS, DigitsFeatureNet, digits_split


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Translate each image by a random -1, 0 or +1 pixel along each axis, filling with background (-1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    i, j = torch.randint(0, 3, (2, len(x)), generator=g)
    r = torch.arange(8)
    rows, cols = (i[:, None] + r)[:, :, None], (j[:, None] + r)[:, None, :]
    return padded[torch.arange(len(x))[:, None, None], 0, rows, cols][:, None]


def accuracy(net: DigitsFeatureNet, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net.head(net(x)).argmax(1) == y).double().mean().item()


def train(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 1e-3) -> tuple[DigitsFeatureNet, float]:
    """Adam on cross-entropy over the shifted training split; returns the network and its held-out accuracy."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_split()
    net = DigitsFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x_train), generator=g).split(batch_size):
            loss = F.cross_entropy(net.head(net(shift(x_train[idx], g))), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}  train acc {accuracy(net, x_train, y_train):.4f}")
    return net.eval(), accuracy(net, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DIGITS_WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    net, acc = train(args.seed, args.epochs)
    print(f"held-out accuracy: {acc:.4f}")
    if acc < 0.95:
        raise SystemExit("held-out accuracy below 0.95: weights not written")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # one metadata key: safetensors writes several in random order, and the file should be byte-reproducible
    save_file(state, args.out, metadata={"trained_by": f"{__file__.rsplit('/', 1)[-1]} --seed {args.seed} "
                                                       f"--epochs {args.epochs}; held-out accuracy {acc:.4f}"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
