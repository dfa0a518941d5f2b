# ruff: noqa  (exploration script, not part of the package)
import torch, sys
torch.set_num_threads(1)
from experiments.tasks import build_task
from models import build_model
task = build_task("parity_vector", size=12, max_nonzero=6)
for seed in (0, 1):
    torch.manual_seed(seed)
    m = build_model({"arch": "serial_loop", "n_layers": 1, "d_model": 16, "n_heads": 2, "mlp_ratio": 2,
                     "vocab_size": 8, "max_seq_len": 13, "halt_token_id": 1})
    b = task.batch("train", 512, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx = m.prepare(b.tokens); z = m.init_state(ctx)
        print("seed", seed, "E rms", float(m.embed.weight.pow(2).mean().sqrt()))
        for k in range(4):
            z = m.step(z, ctx, k)
            last = z[:, -1]
            print(k, "state rms", round(float(last.pow(2).mean().sqrt()), 3),
                  "across-input std/rms", round(float(last.std(0).pow(2).mean().sqrt() / last.pow(2).mean().sqrt()), 4),
                  "logit std", float(m.readout(z, ctx)[:, -1].std(0).mean()))
