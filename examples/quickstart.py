"""Train a tiny Llama (built from config, no download) for a few steps on CPU with the
tilepass backend, then print what was tiled.

    python examples/quickstart.py
"""
import logging

import torch

import tilepass
from tilepass.tiny_models import tiny_model

logging.basicConfig(format="%(message)s")
logging.getLogger("tilepass").setLevel(logging.INFO)  # one line per compiled graph


def main(steps: int = 3, batch: int = 2, seq: int = 256) -> None:
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="tilepass", options={"num_tiles": 4})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}")

    print("\nwhat tilepass did:")
    for r in tilepass.report():
        if r.status == "rewritten":
            print(f"  tiled    {r.module:<22} {r.pattern:<10} {r.tiles} tiles x {r.tile_tokens} tokens, "
                  f"~{r.saved_bytes / 2**20:.2f} MiB of activations not kept")
        else:
            print(f"  left     {r.module:<22} {r.reason}")


if __name__ == "__main__":
    main()
