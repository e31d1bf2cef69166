"""A dump with one tiled MLP and one near miss, for docs/debugging.md.

    python examples/near_miss.py            # writes ./near_miss_dump/
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilepass


class Block(nn.Module):
    def __init__(self, h=32, i=96):
        super().__init__()
        self.norm = nn.RMSNorm(h)
        self.gate, self.up, self.down = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)
        self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, x):
        n = self.norm(x)
        x = x + self.down(F.silu(self.gate(n)) * self.up(n))  # a SwiGLU: tiled
        h = F.gelu(self.fc1(x))
        return x + self.fc2(h - h.mean(dim=1, keepdim=True))  # mixes tokens: left alone


def main(out="near_miss_dump"):
    model = Block()
    with tilepass.dump(out):
        y = torch.compile(model, backend="tilepass", options={"num_tiles": 4, "downstream": "aot_eager"})(torch.randn(2, 64, 32))
        y.sum().backward()
    for r in tilepass.report():
        print(r.status, r.kind, r.pattern, r.module or "<root>", r.reason or f"{r.tiles} tiles")


if __name__ == "__main__":
    main()
