# ruff: noqa  (exploration script, not part of the package)
"""Probe: train one model on parity_vector and read per-step accuracy, expected/sampled depth.

usage: python notes/probe.py '{"objective": "pondernet", "loops": 4, "steps": 500, ...}'
"""
import dataclasses, json, sys, tempfile, time
import numpy as np, torch
torch.set_num_threads(1)
from experiments.config.sections import TrainConfig
from experiments.tasks import build_task
from experiments.train import TrainPlan
from experiments.train.trainer import train_model
from experiments.results.halting_stats import spearman
from halting.objectives import geometric_halting

a = json.loads(sys.argv[1])
seed = a.get("seed", 0)
task_cfg = {"size": 12, "max_nonzero": 6, **a.get("task", {})}
task = build_task("parity_vector", **task_cfg)
fields = {"arch": "serial_loop", "n_layers": 1, "d_model": 16, "n_heads": 2, "mlp_ratio": 2,
          "vocab_size": task.vocab_size, "max_seq_len": task.seq_len, "halt_token_id": 1,
          **a.get("model", {})}
obj = a.get("objective", "pondernet")
ctrl = {"name": obj, **a.get("controller", {})}
loops = a.get("loops", 4)
tc = dataclasses.asdict(TrainConfig())
tc.update(steps=a.get("steps", 500), lr=a.get("lr", 0.003), progress=False, eval_every=a.get("eval_every", 100),
          checkpoint_every=0, device="cpu", **a.get("train", {}))
plan = TrainPlan(f"probe-{obj}", "serial_loop", fields, obj, ctrl, loops, task_cfg)
t0 = time.process_time(); w0 = time.time()
with tempfile.TemporaryDirectory() as d:
    res = train_model(plan, task, tc, d, seed)
train_cpu = time.process_time() - t0
model, controller = res.model.eval(), res.controller.eval()

def analyse(split):
    g = torch.Generator().manual_seed(seed * 1_000_003 + 99)
    b = task.batch(split, 1024, g)
    tok, idx = np.unique(b.tokens.numpy(), axis=0, return_index=True)
    idx = torch.as_tensor(np.sort(idx))
    tokens, targets, diff = b.tokens[idx], b.targets[idx], b.difficulty[idx].numpy()
    K = a.get("eval_loops", loops)
    with torch.no_grad():
        ctx = model.prepare(tokens); z = model.init_state(ctx)
        accs, lams = [], []
        for k in range(K):
            z = model.step(z, ctx, k)
            lg = model.readout(z, ctx)[:, -1]
            accs.append((lg.argmax(-1) == targets[:, -1]).numpy())
            lams.append(torch.sigmoid(model.halt_logit(z, ctx)[:, -1].float()))
    accs = np.stack(accs)  # (K, n)
    out = {"split": split, "n": len(diff)}
    ds = sorted(set(diff))
    out["acc_by_step"] = [round(float(accs[k].mean()), 3) for k in range(K)]
    out["acc_step_diff"] = {int(d): [round(float(accs[k][diff == d].mean()), 2) for k in range(K)] for d in ds}
    if obj in ("pondernet", "ouro_gate"):
        lam = torch.stack(lams[:loops])
        p = geometric_halting(lam).numpy()
        ed = (p * np.arange(1, loops + 1)[:, None]).sum(0)
        gen = torch.Generator().manual_seed(7)
        st = torch.bernoulli(lam, generator=gen).bool(); st[-1] = True
        sd = (st.float().argmax(0) + 1).numpy()
        if obj == "ouro_gate":
            sd = ((np.cumsum(p, 0) >= 0.5 - 1e-6).argmax(0) + 1)
        corr = accs[sd - 1, np.arange(len(sd))]
        out.update(acc=round(float(corr.mean()), 3), mean_depth=round(float(sd.mean()), 2),
                   exp_depth=round(float(ed.mean()), 2),
                   rho_sampled=round(spearman(sd, diff), 3), rho_expected=round(spearman(ed, diff), 3),
                   at_cap=round(float((sd == loops).mean()), 2),
                   ed_by_diff={int(d): round(float(ed[diff == d].mean()), 2) for d in ds},
                   lam_mean=[round(float(x), 3) for x in lam.mean(1)])
    return out

print(json.dumps({"args": a, "train_cpu_s": round(train_cpu, 1), "wall_s": round(time.time() - w0, 1),
                  "hist": [(h["step"], round(h["train_loss"],3), round(h["val_accuracy"],3)) for h in res.history], "val": analyse("val"), "hard": analyse("hard")}))
