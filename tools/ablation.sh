#!/usr/bin/env bash
# The switches of docs/ablations.md, trained on the embedded corpus at equal steps and tokens
# (the `make train` preset: 1600 steps of 2 x 256 tokens), two seeds each, one after another.
#
#   tools/ablation.sh [OUT=runs/ablation]     # ~2 h on the 2-core VM; rerunning skips done runs
#   .venv/bin/python tools/ablation_table.py runs/ablation
#
# Every run shares runs/tiny's tokenizer (make train writes it). The teacher of the distillation
# rows is configs/tiny_teacher.py trained for 3x the student's tokens (4800 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablation}
JAXLM=".venv/bin/jaxlm"
[ -f runs/tiny/tokenizer.model ] || make train
mkdir -p "$OUT"
TOK="--config.data.tokenizer=runs/tiny/tokenizer.model"

run() {  # name seed config [overrides...]
  local name=$1 seed=$2 config=$3
  shift 3
  local dir="$OUT/${name}_s${seed}"
  if [ -f "$dir/done" ]; then return; fi
  rm -rf "$dir"
  echo "== $dir $*" >&2
  "$JAXLM" train --config="$config" --workdir="$dir" $TOK --config.train.seed="$seed" "$@" \
    > "$dir.log" 2>&1
  touch "$dir/done"
}

for seed in 0 1; do
  run plain "$seed" configs/tiny.py
  run entropy_plus "$seed" configs/tiny.py --config.loss.attention_entropy=0.1
  run entropy_minus "$seed" configs/tiny.py --config.loss.attention_entropy=-0.1
  run entropy_plus_small "$seed" configs/tiny.py --config.loss.attention_entropy=0.01
  run entropy_minus_small "$seed" configs/tiny.py --config.loss.attention_entropy=-0.01
  run focal "$seed" configs/tiny.py --config.loss.focal_gamma=1.0
  run sequence "$seed" configs/tiny.py --config.loss.sequence_weighting=mean_loss
done
run teacher 0 configs/tiny_teacher.py  # 4800 steps: 3x the student's tokens
for seed in 0 1; do
  run distill "$seed" configs/tiny_distill.py --config.distill.teacher="$OUT/teacher_s0"
done

# The overhead of each switch: `jaxlm bench` (the real train step on synthetic tokens, 50 steps
# after 5 warm-up), one after another in one sitting, three rounds.
bench() {  # name [overrides...]
  local name=$1
  shift
  echo "{\"bench\": \"$name\", \"result\": $("$JAXLM" bench --config=configs/tiny.py $TOK --steps=50 \
    --warmup=5 "$@" 2>/dev/null | tail -1)}" >> "$OUT/bench.jsonl"
}
[ -f "$OUT/bench.done" ] && { echo "ablation runs done: $OUT" >&2; exit 0; }
rm -f "$OUT/bench.jsonl"
for round in 1 2 3; do
  bench plain
  bench entropy_plus --config.loss.attention_entropy=0.1
  bench focal --config.loss.focal_gamma=1.0
  bench sequence --config.loss.sequence_weighting=mean_loss
  bench distill --config.distill.teacher="$OUT/teacher_s0" --config.distill.alpha=0.5 \
    --config.distill.temperature=2.0
done
touch "$OUT/bench.done"
echo "ablation runs done: $OUT" >&2
