# usage: notes/p.sh JSON...  -> one summary line per trial appended to notes/trials.log
cd /work/wt/ponder
for j in "$@"; do
OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 19 /work/main/.venv/bin/python notes/probe.py "$j" | python3 -c "
import json,sys; d=json.load(sys.stdin); v=d['val']; h=d['hard']
s={k:v.get(k) for k in ('acc','mean_depth','exp_depth','rho_sampled','rho_expected','at_cap','ed_by_diff','lam_mean') if v.get(k) is not None}
print(json.dumps(d['args']), 'cpu', d['train_cpu_s'], 'hist', d['hist'], 'val_acc_by_step', v['acc_by_step'], 'per_diff', v['acc_step_diff'], s, 'hard', h['acc_by_step'], {k:h.get(k) for k in ('acc','mean_depth','rho_expected')})" | tee -a notes/trials.log
done
