#!/usr/bin/env bash
# The CUDA measurements of docs/benchmarks.md ("GPU"), run from the project root on a CUDA machine where
# `python3 -m zotune train` finds SmolLM2-135M and the task files (../shared/gpu/stage-smollm2.sh stages them).
#   bash benchmarks/gpu_speed.sh steps      # step times: mezo_step at two shapes, SmolLM2 training steps
#   bash benchmarks/gpu_speed.sh accuracy   # 1,000-step SmolLM2 SST-2 runs of MeZO and LOZO (both at once)
# With BEFORE=<dir> holding another version's src/, the SmolLM2 step times are measured for it too, in turn.
# Results go to ${OUT:-/tmp/gpu-speed}.
set -uo pipefail
out=${OUT:-/tmp/gpu-speed}
mkdir -p "$out"
train() {  # train <source dir> <run name> <zotune train arguments...>
  local src=$1 name=$2
  shift 2
  PYTHONPATH="$src:$PYTHONPATH" python3 -m zotune train --model.device cuda --optim.trainable all \
    --train.output_dir "$out/runs" --train.run_name "$name" --train.progress false "$@" > "$out/$name.txt" 2>&1
  tail -n 2 "$out/$name.txt"
}
median_step() {  # the median of a run's logged step seconds, the first 10 (warm-up, capture) left out
  python3 -c "import json, statistics, sys; s = [json.loads(l)['seconds'] for l in open(sys.argv[1]) if '\"seconds\"' in l]
print(f'{sys.argv[2]}: median step {1000 * statistics.median(s[10:]):.1f} ms over {len(s) - 10} steps')" \
    "$out/runs/$1/log.jsonl" "$1"
}
case ${1:-steps} in
steps)
  python3 benchmarks/mezo_step.py --device cuda --shape opt-1.3b --dtype float16 --batch 16 --repeats 10 | tee "$out/opt-1.3b.md"
  python3 benchmarks/mezo_step.py --device cuda --shape llama-2-7b --dtype bfloat16 --batch 16 --repeats 5 --no-memory \
    | tee "$out/llama-2-7b.md"
  for method in mezo lozo; do
    for version in now ${BEFORE:+before}; do
      src=$PWD/src
      [ "$version" = before ] && src=$BEFORE/src
      train "$src" "$version-$method" --optim.method "$method" --train.steps 300 --train.eval_every 0 \
        --train.zero_shot false
      median_step "$version-$method" | tee -a "$out/smollm2-steps.md"
    done
  done
  ;;
accuracy)
  for method in mezo lozo; do
    train "$PWD/src" "acc-$method" --optim.method "$method" --train.steps 1000 &
  done
  wait
  for method in mezo lozo; do
    median_step "acc-$method" | tee -a "$out/smollm2-accuracy.md"
    grep -E "fine-tuned|zero-shot|testing the weights|divergence" "$out/acc-$method.txt" | tee -a "$out/smollm2-accuracy.md"
  done
  ;;
esac
