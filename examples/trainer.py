"""transformers.Trainer with tilepass, on CPU, for a few steps.

``TrainingArguments(torch_compile_backend="tilepass")`` is refused by accelerate, which
checks backend names against a fixed list (``ValueError: 'TILEPASS' is not a valid
DynamoBackend``). Compile the model in place with ``tilepass.compile`` instead and leave
``torch_compile`` off: the module keeps its class and state_dict keys, so Trainer,
checkpointing and ``save_pretrained`` work as usual.

    python examples/trainer.py
"""
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import tilepass
from tilepass.tiny_models import tiny_model


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(output_dir: str, steps: int = 3, seq: int = 128) -> list[dict]:
    model = tiny_model("llama")
    tilepass.compile(model, num_tiles=4)  # in place; returns the same module
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        torch_compile=False,  # tilepass.compile already did it
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(16, seq, model.config.vocab_size))
    trainer.train()
    return trainer.state.log_history


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        for entry in main(d):
            print(entry)
    for r in tilepass.report():
        print(r.status, r.module, r.pattern, r.tiles, r.reason or "")
