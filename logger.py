"""
What a run logs: one JSON line per step in metrics.jsonl (always), and the same numbers to
TensorBoard and Weights & Biases when asked (--logger). The README's metrics table says what each
key means.
"""

import json
from pathlib import Path


class MetricsLog:
    """Rank 0's writer: args.json (the run's config) once, metrics.jsonl plus the optional backends
    every step; the other ranks get none."""

    def __init__(self, out: Path, backends: list[str], config: dict):
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                  for k, v in config.items()}, indent=1))
        self.path, self.writers, self.closers = out / "metrics.jsonl", [], []
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(out / "tb")
            self.writers.append(lambda m, s: [tb.add_scalar(k, v, s) for k, v in m.items() if isinstance(v, (int, float))])
            self.closers.append(tb.close)
        if "wandb" in backends:
            import wandb
            wandb.init(project="prefix-opd", config=config, dir=str(out))
            self.writers.append(lambda m, s: wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=s))
            self.closers.append(wandb.finish)

    def write(self, metrics: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for write in self.writers:
            write(metrics, metrics["step"])

    def close(self):
        for close in self.closers:
            close()

