#!/usr/bin/env bash
# The reference trainer end to end, under chorusrun:
#  1. Data parallelism changes nothing but the arithmetic's order: 3 ranks
#     end within float rounding of 1 rank with the same global batch, and
#     both moved away from the initial parameters.
#  2. Averaging layer by layer during backward (the default), after it
#     (--no-overlap), and as named tensors through the engine (--engine)
#     give bitwise the same parameters at 2 ranks, where a sum of two floats
#     is the same in any order.
#  2c. Uneven shards (--engine --uneven K): with K = 0 each rank's mean
#     averaged by the engine equals the 1/B-scaled sum within float
#     rounding; with K = 5 rank r runs 5r steps fewer and joins the engine
#     when out of data, rank 0 joins last, its parameters are broadcast,
#     and the replicas are equal.
#  2d. ZeRO-1 (--shard): the gradient reduce-scattered to each rank's
#     shard, Adam on the shard, the parameters allgathered: bitwise the
#     parameters of 2. at 2 ranks; at 4 ranks, whose shards of the 15222
#     parameters differ by one (reduce_scatterv and allgatherv with counts
#     that differ), within float rounding of 3 ranks, and the replicas equal.
#  3. It learns: the first validation loss is log V (V counted here from the
#     text), and after the steps it is well below the loss of the best
#     model that ignores the context (the training text's byte frequencies),
#     also computed here. STEPS 0 leaves this part out.
# Usage: trainer_test.sh CHORUSRUN TRAINER STEPS
set -euo pipefail
run=$1
trainer=$2
steps=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

common=(--batch 96 --hidden 64 --sample 0 --eval-examples 2000 --log-every 10)
echo "== 1. one rank and three ranks, 30 steps"
"$run" -n 1 -- "$trainer" "${common[@]}" --steps 0 --save "$work/p0" >/dev/null
"$run" -n 1 -- "$trainer" "${common[@]}" --steps 30 --save "$work/p1" > "$work/one.log"
"$run" -n 3 -- "$trainer" "${common[@]}" --steps 30 --save "$work/p3" > "$work/three.log"
echo "== 2. layer by layer during backward, and after it, two ranks"
"$run" -n 2 -- "$trainer" "${common[@]}" --steps 30 --save "$work/o1" >/dev/null
"$run" -n 2 -- "$trainer" "${common[@]}" --steps 30 --save "$work/o2" --no-overlap >/dev/null
cmp "$work/o1" "$work/o2"
echo "   bitwise equal"
echo "== 2b. the same through the tensor engine (--engine), with its timeline"
"$run" -n 2 -- "$trainer" "${common[@]}" --steps 30 --save "$work/o3" --engine \
  --timeline "$work/timeline.json" > "$work/engine.log"
cmp "$work/o1" "$work/o3"
grep -q "engine: 150 tensors in" "$work/engine.log"
python3 -c "import json, sys; e = json.load(open(sys.argv[1])); assert any(x['name'] == 'ALLREDUCE' for x in e)" \
  "$work/timeline.json"
echo "   bitwise equal; 150 tensors; the timeline is JSON"
echo "== 2c. uneven shards through the engine's join (--uneven), three ranks"
"$run" -n 3 -- "$trainer" "${common[@]}" --steps 30 --engine --uneven 0 --save "$work/u0" >/dev/null
"$run" -n 3 -- "$trainer" "${common[@]}" --steps 30 --engine --uneven 5 --save "$work/u5" \
  > "$work/uneven.log"
grep -q "rank 0 joined last (30 steps); its parameters broadcast" "$work/uneven.log"
grep -q "the 3 replicas are equal" "$work/uneven.log"
grep -q "engine: 153 tensors in" "$work/uneven.log"  # 150 gradients, 3 loss lines
echo "   rank 0 joined last; 153 tensors; the replicas are equal"
echo "== 2d. ZeRO-1: sharded optimizer state (--shard), two and four ranks"
"$run" -n 2 -- "$trainer" "${common[@]}" --steps 30 --save "$work/z2" --shard >/dev/null
cmp "$work/o1" "$work/z2"
"$run" -n 4 -- "$trainer" "${common[@]}" --steps 30 --save "$work/z4" --shard > "$work/shard.log"
grep -q "15222 parameters" "$work/shard.log"
grep -q "first_r + 3805 or 3806)" "$work/shard.log"
grep -q "the 4 replicas are equal" "$work/shard.log"
echo "   2 ranks bitwise equal; 4 ranks in shards of 3806 and 3805, the replicas equal"
if [[ "$steps" == 0 ]]; then
  learn=0
  echo "== 3. learning: left out (STEPS 0)"
else
  learn=1
  echo "== 3. learning: three ranks, $steps steps"
"$run" -n 3 -- "$trainer" --steps "$steps" --eval-every "$steps" --log-every "$steps" --eval-examples 8000 --sample 0 \
  > "$work/learn.log"
cat "$work/learn.log"
grep -q "the 3 replicas are equal" "$work/learn.log"
fi

python3 - "$work" "$learn" <<'PY'
import array, math, os, re, sys
work, learn = sys.argv[1], sys.argv[2] == '1'
def params(name):
    a = array.array('f')
    with open(os.path.join(work, name), 'rb') as f:
        a.frombytes(f.read())
    return a
p0, p1, p3 = params('p0'), params('p1'), params('p3')
assert len(p0) == len(p1) == len(p3) > 0, (len(p0), len(p1), len(p3))
moved = max(abs(a - b) for a, b in zip(p0, p1))
diff = max(abs(a - b) for a, b in zip(p1, p3))
print(f"1 rank moved the parameters by up to {moved:.3g}; 3 ranks differ from 1 by up to {diff:.3g}")
assert moved > 1e-2, "30 steps did not move the parameters"
assert diff < 1e-5, "3 ranks diverged from 1 rank"
u0, u5 = params('u0'), params('u5')
avg_diff = max(abs(a - b) for a, b in zip(u0, p3))
uneven_diff = max(abs(a - b) for a, b in zip(u5, p3))
print(f"--uneven 0 differs from the summed gradients by up to {avg_diff:.3g}; --uneven 5 by {uneven_diff:.3g}")
assert avg_diff < 1e-5, "the engine's average of the ranks' means is not the batch's mean"
assert uneven_diff > 1e-4, "--uneven 5 trained as if every rank had every step"
z4 = params('z4')
shard_diff = max(abs(a - b) for a, b in zip(z4, p3))
print(f"--shard on 4 ranks differs from 3 ranks by up to {shard_diff:.3g}")
assert shard_diff < 1e-5, "the sharded optimizer diverged from the replicated one"
if not learn:
    sys.exit(0)

# The text as the trainer reads it by default: the regular files of
# /usr/share/common-licenses in name order, the last tenth for validation.
d = '/usr/share/common-licenses'
names = sorted(f for f in os.listdir(d)
               if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))
text = b''.join(open(os.path.join(d, f), 'rb').read() for f in names)
n_val = len(text) // 10
train, val = text[:len(text) - n_val], text[len(text) - n_val:]
V = len(set(text))
counts = [0] * 256
for b in train:
    counts[b] += 1
# Add-one smoothing over the alphabet: every byte of the text has a probability.
unigram = -sum(math.log((counts[b] + 1) / (len(train) + V)) for b in val[8:8 + 8000]) / min(8000, len(val) - 8)

log = open(os.path.join(work, 'learn.log')).read()
rows = re.findall(r'^\[0\]\s+(\d+)\s+(?:([\d.]+)\s+)?([\d.]+)\s', log, re.M)
first = [float(v) for s, _, v in rows if s == '0']
last = [float(v) for s, _, v in rows if s != '0']
assert first and last, "no validation losses in the log"
print(f"validation loss: first {first[0]:.4f} (log V = {math.log(V):.4f}), last {last[-1]:.4f}; "
      f"context-free model {unigram:.4f}")
assert abs(first[0] - math.log(V)) < 0.05, "the first loss is not log V"
assert last[-1] < 0.85 * unigram, "the model did not learn beyond byte frequencies"
PY
