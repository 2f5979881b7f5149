#!/usr/bin/env bash
# The CUDA measurements of docs/benchmarks.md ("GPU"), run from the project root on a CUDA machine where
# `python3 -m zotune train` finds SmolLM2-135M and the task files (../shared/gpu/stage-smollm2.sh stages them).
#   bash benchmarks/gpu_speed.sh steps      # step times: mezo_step at two shapes, SmolLM2 training steps (3 methods)
#   bash benchmarks/gpu_speed.sh train-steps  # the SmolLM2 training steps only
#   bash benchmarks/gpu_speed.sh accuracy   # 1,000-step SmolLM2 SST-2 runs of MeZO and LOZO (both at once)
#   bash benchmarks/gpu_speed.sh batched    # AdaZeta q = 1 and 10, in place and batched (captured, compiled, eager);
#                                           MeZO-LoRA vs inference (PATHS=... picks the AdaZeta variants)
#   bash benchmarks/gpu_speed.sh breakdown  # SmolLM2 MeZO and LOZO steps profiled: forwards, perturbation, host (a plot)
#   bash benchmarks/gpu_speed.sh passes     # the passes' floors: passes beside the forwards (two shapes), the low-rank
#                                           kernel's tiles, LOZO's window starts (7B and SmolLM2 shapes)
#   bash benchmarks/gpu_speed.sh adazeta-profile  # the batched AdaZeta step profiled at q = 1 and q = 10
#   bash benchmarks/gpu_speed.sh scale      # 2 GPUs: FSDP2, device_map, offload vs one GPU (7B shape); trajectory resume
#                                           (VARIANTS=single,offload on one GPU)
#   bash benchmarks/gpu_speed.sh offload    # one GPU: offload vs in-GPU (7B shape), each with a one-step profile
# With BEFORE=<dir> holding another version's src/, the SmolLM2 step times are measured for it too, in turn.
# With COMPILE=true, train-steps, breakdown and adazeta-profile compile the captured forwards (train.compile).
# Results go to ${OUT:-/tmp/gpu-speed}; the training runs' folders to ${RUNS:-/tmp/gpu-speed-runs}.
set -uo pipefail
out=${OUT:-/tmp/gpu-speed}
compile=${COMPILE:-false}
tag=$([ "$compile" = true ] && echo "-compiled" || echo "")
runs=${RUNS:-/tmp/gpu-speed-runs}
mkdir -p "$out" "$runs"
train() {  # train <source dir> <run name> <zotune train arguments...>
  local src=$1 name=$2
  shift 2
  PYTHONPATH="$src:$PYTHONPATH" python3 -m zotune train --model.device cuda --optim.trainable all \
    --train.output_dir "$runs" --train.run_name "$name" --train.progress false "$@" > "$out/$name.txt" 2>&1
  tail -n 2 "$out/$name.txt"
}
scale_7b() {  # scale_step.py at the Llama-2-7B shape, bfloat16, batch 16 x 256, 5 timed steps, each variant alone
  python3 benchmarks/scale_step.py --device cuda --shape llama-2-7b --dtype bfloat16 --batch 16 --tokens 256 \
    --repeats 5 "$@"
}
median_step() {  # the median of a run's logged step seconds, the first 10 (warm-up, capture) left out
  python3 -c "import json, statistics, sys; s = [json.loads(l)['seconds'] for l in open(sys.argv[1]) if '\"seconds\"' in l]
print(f'{sys.argv[2]}: median step {1000 * statistics.median(s[10:]):.1f} ms over {len(s) - 10} steps')" \
    "$runs/$1/log.jsonl" "$1"
}
case ${1:-steps} in
steps)
  python3 benchmarks/mezo_step.py --device cuda --shape opt-1.3b --dtype float16 --batch 16 --repeats 10 \
    --breakdown "$out/steps-opt-1.3b.json" | tee "$out/opt-1.3b.md"
  python3 benchmarks/mezo_step.py --device cuda --shape llama-2-7b --dtype bfloat16 --batch 16 --repeats 5 --no-memory \
    --breakdown "$out/steps-llama-2-7b.json" | tee "$out/llama-2-7b.md"
  python3 benchmarks/plot_step_breakdown.py "$out"/steps-*.json --out "$out/step_breakdown.png"  # docs/step_breakdown.png
  bash "$0" train-steps
  ;;
train-steps)
  for method in mezo lozo mezo_adam; do  # MeZO-Adam: the stateful rules' multi-tensor update
    for version in now ${BEFORE:+before}; do
      src=$PWD/src
      [ "$version" = before ] && src=$BEFORE/src
      train "$src" "$version-$method$tag" --optim.method "$method" --train.steps 300 --train.eval_every 0 \
        --train.zero_shot false $([ "$version" = now ] && echo "--train.compile $compile")
      median_step "$version-$method$tag" | tee -a "$out/smollm2-steps.md"
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
batched)
  for q in 1 10; do  # an epoch is one step (16 examples): from the second step on, Q = min(1000 e^β, q)
    for path in ${PATHS:-inplace batched batched-compiled batched-eager}; do  # batched-eager: no CUDA graphs
      python3 -m zotune train --model.device cuda --optim.method adazeta --adapter.kind adp --adapter.train_norms false \
        --optim.q_max $q --optim.q_alpha 1000 --data.n_train 16 --optim.batched $([ $path = inplace ] && echo false || echo true) \
        --train.cuda_graphs $([ $path = batched-eager ] && echo false || echo true) \
        --train.compile $([ $path = batched-compiled ] && echo true || echo false) \
        --train.steps 60 --train.eval_every 0 --train.zero_shot false --data.n_test 64 --train.progress false \
        --train.output_dir "$runs" --train.run_name "adazeta-q$q-$path" > "$out/adazeta-q$q-$path.txt" 2>&1
      median_step "adazeta-q$q-$path" | tee -a "$out/batched.md"
    done
  done
  for path in inplace batched; do
    python3 -m zotune bench --model.device cuda --optim.method mezo --adapter.kind lora --optim.eps 0.01 \
      --optim.batched $([ $path = batched ] && echo true || echo false) --train.output_dir "$runs/bench-lora-$path" \
      2>&1 | grep -v "^written" | tee -a "$out/batched.md"
  done
  ;;
breakdown)
  for method in mezo lozo; do
    python3 benchmarks/profile_training.py --breakdown "$out/breakdown-$method$tag.json" --model.device cuda \
      --optim.trainable all --optim.method "$method" --train.compile $compile > "$out/profile-$method$tag.txt" 2>&1
    tail -n 1 "$out/profile-$method$tag.txt"
  done
  python3 benchmarks/plot_step_breakdown.py "$out"/breakdown-mezo$tag.json "$out"/breakdown-lozo$tag.json \
    --out "$out/smollm2_step_breakdown$tag.png"
  ;;
passes)
  for shape in "llama-2-7b bfloat16" "opt-1.3b float16"; do
    set -- $shape
    python3 benchmarks/pass_overlap.py --shape "$1" --dtype "$2"
  done | tee "$out/pass-overlap.md"
  python3 benchmarks/perturb_pass.py --lowrank | tee "$out/lowrank-tiles.md"
  for shape in "llama-2-7b bfloat16" "smollm2-135m float32"; do
    set -- $shape
    python3 benchmarks/lozo_window.py --device cuda --shape "$1" --dtype "$2"
  done | tee "$out/lozo-window.md"
  ;;
adazeta-profile)
  for q in 1 10; do  # as in `batched`: from the second step on, the schedule gives Q
    python3 benchmarks/profile_training.py --breakdown "$out/breakdown-adazeta-q$q$tag.json" --model.device cuda \
      --optim.method adazeta --adapter.kind adp --adapter.train_norms false --optim.q_max $q --optim.q_alpha 1000 \
      --data.n_train 16 --optim.batched true --train.zero_shot false --data.n_test 64 --train.compile $compile \
      > "$out/profile-adazeta-q$q$tag.txt" 2>&1
    tail -n 1 "$out/profile-adazeta-q$q$tag.txt"
  done
  ;;
offload)
  scale_7b --variants single,offload --profile "$out/profile" 2>"$out/offload-errors.txt" | tee "$out/offload.md"
  ;;
scale)
  scale_7b --variants "${VARIANTS:-single,fsdp,device_map,offload}" 2>"$out/scale-errors.txt" | tee "$out/scale.md"
  python3 benchmarks/trajectory_resume.py --out "$runs/resume" --stop-after 990 -- --model.device cuda \
    --optim.method mezo --optim.trainable all --train.steps 1000 --train.eval_every 0 --data.n_test 200 \
    2>&1 | tee "$out/resume.md"
  ;;
esac
