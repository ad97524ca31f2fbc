"""Time a PyTorch MNIST CGN train step with the official layer shapes, on this machine.

The issue quotes the official step on "a 2-core CPU" (about 370 ms at batch 16, 1.4 s at
batch 64). CPU speed on shared VMs drifts by tens of percent between hours, so comparing
`cgn-jax bench` with those figures alone is weak. This script rebuilds the official step
in PyTorch, written for this comparison from the published architecture (not the
official code): the three mechanisms (linear stem, nearest-upsample + 3x3 conv + BN +
LeakyReLU blocks, instance norms on the shape path, tanh texture heads), the tile-and-crop
texture shift, the composer, the linear discriminator (ndf 512, dropout 0.4), LSGAN losses,
the binary mask loss, and the VGG16 Gram-matrix style loss at relu1_2..relu4_3 on the fake
and the real batch (all four blocks run, as the official hooks do). One step is the
generator update, then the discriminator update on the detached fake, with Adam each.
Weights are random (timing does not depend on them) and torchvision is not needed.

    pip install torch   # CPU wheel; not a cgn-jax dependency
    python benchmarks/torch_mnist_step.py --batch 16 --steps 20

Run it back to back with `cgn-jax bench --batch N` on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

LATENT, CLASSES, NGF, NDF, SIZE = 32, 10, 32, 512, 32
STYLE = (0.05, 0.1, 0.01, 0.0)  # colored MNIST
VGG = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512))


def up_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.2, inplace=True)]


class Mechanism(nn.Module):
    def __init__(self, body: list[nn.Module], in_norm: bool):
        super().__init__()
        self.stem = nn.Linear(LATENT + CLASSES, NGF * 2 * 8 * 8)
        self.in_norm = nn.InstanceNorm2d(NGF * 2) if in_norm else nn.Identity()
        self.body = nn.Sequential(*body)

    def forward(self, inp):
        return self.body(self.in_norm(self.stem(inp).view(-1, NGF * 2, 8, 8)))


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(CLASSES, CLASSES)
        self.shape = Mechanism([*up_block(NGF * 2, NGF), nn.InstanceNorm2d(NGF), *up_block(NGF, 1),
                                nn.InstanceNorm2d(1)], in_norm=True)
        texture = lambda: Mechanism([*up_block(NGF * 2, NGF * 2), *up_block(NGF * 2, NGF),  # noqa: E731
                                     nn.Conv2d(NGF, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()], in_norm=False)
        self.fg, self.bg = texture(), texture()

    def forward(self, y):
        inp = torch.cat([torch.randn(len(y), LATENT), self.emb(y)], 1)
        mask = self.shape(inp).clamp(1e-4, 1 - 1e-4)
        shift = lambda t: torch.roll(t.repeat(1, 1, 2, 2), tuple(torch.randint(SIZE, (2,)).tolist()), (2, 3))[  # noqa: E731
            :, :, :SIZE, :SIZE]
        fg, bg = shift(self.fg(inp)), shift(self.bg(inp))
        return mask, mask * fg + (1 - mask) * bg


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(CLASSES, CLASSES)
        self.net = nn.Sequential(
            nn.Linear(CLASSES + 3 * SIZE * SIZE, NDF), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(NDF, NDF), nn.Dropout(0.4), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(NDF, NDF), nn.Dropout(0.4), nn.LeakyReLU(0.2, inplace=True), nn.Linear(NDF, 1))

    def forward(self, x, y):
        return self.net(torch.cat([x.flatten(1), self.emb(y)], 1)).squeeze(1)


class VGGStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks, cin = nn.ModuleList(), 3
        for i, widths in enumerate(VGG):
            layers = [nn.MaxPool2d(2)] if i else []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]
                cin = w
            self.blocks.append(nn.Sequential(*layers))
        self.requires_grad_(False)

    def features(self, x):
        out = []
        for b in self.blocks:
            x = b(x)
            out.append(x)
        return out

    def forward(self, fake, real):
        def gram(f):
            n, c, h, w = f.shape
            f = f.flatten(2)
            return f @ f.transpose(1, 2) / (c * h * w)

        loss = 0.0
        for wgt, a, b in zip(STYLE, self.features(fake), self.features(real)):
            loss = loss + wgt * F.l1_loss(gram(a), gram(b))
        return loss


def binary_loss(mask):
    return 0.1 * (-mask * torch.log2(mask) - (1 - mask) * torch.log2(1 - mask)).mean()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    g, d, vgg = Generator(), Discriminator(), VGGStyle().eval()
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    x_real = torch.rand(a.batch, 3, SIZE, SIZE) * 2 - 1
    y_real = torch.randint(CLASSES, (a.batch,))
    ones, zeros = torch.ones(a.batch), torch.zeros(a.batch)

    def step():
        opt_g.zero_grad()
        y = torch.randint(CLASSES, (a.batch,))
        mask, x_fake = g(y)
        loss_g = F.mse_loss(d(x_fake, y), ones) + binary_loss(mask) + vgg(x_fake, x_real)
        loss_g.backward()
        opt_g.step()
        opt_d.zero_grad()
        loss_d = (F.mse_loss(d(x_real, y_real), ones) + F.mse_loss(d(x_fake.detach(), y), zeros)) / 2
        loss_d.backward()
        opt_d.step()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"batch": a.batch, "steps": a.steps, "median_ms": 1000 * statistics.median(times),
              "min_ms": 1000 * min(times), "max_ms": 1000 * max(times), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    print(json.dumps(result) if a.json else
          f"PyTorch step, batch {a.batch}: median {result['median_ms']:.1f} ms over {a.steps} "
          f"(min {result['min_ms']:.1f}, max {result['max_ms']:.1f}), torch {torch.__version__}, "
          f"{result['threads']} threads")


if __name__ == "__main__":
    main()
