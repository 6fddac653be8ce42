#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md's tables, in parts
# that each fit one device call. Each writes its log to $OUT/<part>.log (default: ./bench-out).
#   tools/bench_session.sh gputests|tests|lifecycle|large|large128k|regions|docmask|small|small50|accum|accum13|
#     autocast|autocast124|autocast128k|autocast13|syncs|order124|trace|fp8loss|fp8loss13|startup|caps|scaling|scaling3|launcher [more parts]
# scaling, scaling3 and launcher need two GPUs (nvidia-h200-x2).
# The shapes the speed tables use: 12M (6 x 384, seq 256, micro 64, vocab 2048), 124M (12 x 768, MHA,
# vocab 50304, micro 8), 1.3B (24 x 2048, MHA, ffn 5632, vocab 50304, micro 8; 128k vocab: micro 4).
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
DL="python3 -m dist_lm"
S12="model.n_layers=6 model.d_model=384 model.n_heads=6 model.n_kv_heads=null model.seq_len=256 data.embedded_vocab_size=2048 train.micro_batch_size=64 parallel.activation_checkpointing=false"
S124="model.n_layers=12 model.d_model=768 model.n_heads=12 model.n_kv_heads=null model.seq_len=2048 model.vocab_size=50304 train.micro_batch_size=8 parallel.activation_checkpointing=false"
S1300="model.n_kv_heads=null model.ffn_hidden=5632 model.vocab_size=50304 train.micro_batch_size=8"
S128K="model.n_kv_heads=null model.ffn_hidden=5632 model.vocab_size=128256 train.micro_batch_size=4"
BENCH="$DL bench --warmup 5 --steps 10 --timeout 300 --baseline"

# A training run that SIGTERM stops finishes its step and saves a checkpoint (35-38 s at 1.1B on
# the H200's disk), more than the 10 s grace below: such a part ends "exit 137" after its
# one-line stop message. Nothing here needs that checkpoint.
# At 1.3B an H200 trains at its 700 W power cap, where the SM clock (and so a step's time) moves
# with the power the work draws: each part samples clock and power into $OUT/NAME-gpu.csv and prints
# the GPU's busy stretches (a bench's baseline and its variants, in order) with their means.
part() {  # part NAME SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log
  local name=$1 limit=$2 sampler="" status; shift 2
  echo "== $name: $*" | tee -a "$OUT/$name.log"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,clocks.sm,power.draw,clocks_throttle_reasons.active \
      --format=csv,noheader,nounits -lms 250 >>"$OUT/$name-gpu.csv" 2>/dev/null &
    sampler=$!
  fi
  timeout -k 10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  status=$?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  echo "== $name: exit $status" | tee -a "$OUT/$name.log"
  grep -E '^\||scaling|passed|failed|error' "$OUT/$name.log" | tail -20
  [ -n "$sampler" ] && busy_stretches "$OUT/$name-gpu.csv" | tee -a "$OUT/$name.log"
}

busy_stretches() {  # busy_stretches CSV: runs of 2 s or more at 90% utilisation or above, with mean clock and power
  awk -F', *' 'function flush() { if (n >= 8) printf "   GPU busy from %s for %d samples: SM clock %.0f MHz, %.0f W\n", start, n, c / n, w / n; n = c = w = 0 }
    $2 + 0 >= 90 { if (!n) start = substr($1, 12, 8); n++; c += $3; w += $4; next } { flush() } END { flush() }' "$1"
}

for what in "$@"; do case $what in
gputests)  # the GPU tests other than the compiled lifecycle, fp8, DeepCompile and find_batch
  part gputests 330 python3 -m pytest -m gpu -v tests/test_gpu.py --durations=0 \
    -k "not lifecycle and not fp8 and not deepcompile and not find_batch" ;;
tests)
  part tests 540 python3 -m pytest -m gpu -q -x tests/test_gpu.py \
    -k "fp8 or chunked or lifecycle" ;;
lifecycle)  # the compiled lifecycle in bf16 at ZeRO-1 and in bf16-autocast at ZeRO-0
  part lifecycle 300 python3 -m pytest -m gpu -q tests/test_gpu.py -k lifecycle ;;
large)  # 1.3B in bf16 and fp8 (the whole model compiled, the default) and the 128k vocabulary, beside plain PyTorch
  part large-1.3b 330 $BENCH --config h100-80gb --variant "bf16: parallel.precision=bf16" \
    --variant "fp8: parallel.precision=fp8" $S1300
  bash "$0" large128k ;;
large128k)  # 1.3B with Llama 3's 128k vocabulary, beside plain PyTorch
  part large-128k 240 $BENCH --config h100-80gb --variant "bf16, full loss (auto): model.cross_entropy=auto" $S128K ;;
regions)  # the blocks compiled one by one (parallel.compile_regions) at 1.3B, bf16 and fp8
  part regions 400 $BENCH --config h100-80gb --variant "bf16, regions: parallel.compile_regions=true" \
    --variant "fp8, regions: parallel.precision=fp8 parallel.compile_regions=true" $S1300 ;;
docmask)  # what the document mask costs at 1.3B (the packed row: large's bf16)
  part docmask 200 $DL bench --warmup 5 --steps 10 --config h100-80gb \
    --variant "bf16, document mask: data.document_mask=true" $S1300 ;;
small)  # 12M and 124M, every micro-batch a step, the whole model compiled; the 12M engine profiled
  part small-12m 150 $BENCH --config h100-80gb --profile "$OUT/profile" --variant "zero1: parallel.zero_stage=1" $S12
  part small-124m 150 $BENCH --config h100-80gb --variant "zero1: parallel.zero_stage=1" $S124 ;;
small50)  # 12M again over 50 timed steps (small's 10 are a fifth of a second), beside plain PyTorch
  part small-12m-50 200 $DL bench --warmup 10 --steps 50 --timeout 150 --baseline --config h100-80gb \
    --variant "zero1: parallel.zero_stage=1" $S12 ;;
accum)  # the preset's accumulation instead of a step per micro-batch: 124M at h100-80gb's 64
  # micro-batches per step, 1.3B at 16 (64 would be 17 s a step)
  part accum-124m 200 $DL bench --warmup 2 --steps 4 --accum 64 --timeout 120 --baseline --config h100-80gb \
    --variant "zero1: parallel.zero_stage=1" $S124
  bash "$0" accum13 ;;
accum13)  # 1.3B at 16 micro-batches a step, beside plain PyTorch
  part accum-1.3b 330 $DL bench --warmup 2 --steps 4 --accum 16 --timeout 200 --baseline --config h100-80gb \
    --variant "zero1: parallel.zero_stage=1" $S1300 ;;
autocast)  # bf16-autocast (fp32 weights under torch.autocast, ZeRO-0) beside plain PyTorch and bf16 at ZeRO-1: 124M, 1.3B at 128k
  part autocast-124m 200 $BENCH --config h100-80gb --variant "bf16 zero1: parallel.zero_stage=1" \
    --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $S124
  bash "$0" autocast128k ;;
autocast128k)  # bf16-autocast at 1.3B with the 128k vocabulary, beside plain PyTorch
  part autocast-128k 260 $BENCH --config h100-80gb \
    --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $S128K ;;
autocast124)  # bf16-autocast at 124M beside plain PyTorch (after its skip moved onto the device)
  part autocast-124m 200 $BENCH --config h100-80gb \
    --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $S124 ;;
autocast13)  # the same at 1.3B with the 50k vocabulary, and at 12M over 50 timed steps
  part autocast-1.3b 300 $BENCH --config h100-80gb \
    --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $S1300
  part autocast-12m 200 $DL bench --warmup 10 --steps 50 --timeout 150 --baseline --config h100-80gb \
    --variant "bf16 zero1: parallel.zero_stage=1" \
    --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $S12 ;;
syncs)  # the host-device syncs of the steady training step (tools/sync_audit.py): 124M in bf16-autocast and bf16 ZeRO-1
  for v in "autocast parallel.precision=bf16-autocast parallel.zero_stage=0" "bf16z1 parallel.precision=bf16 parallel.zero_stage=1"; do
    set -- $v
    part syncs-124m-$1 200 python3 tools/sync_audit.py --from-step 20 --steps 3 -- --config h100-80gb $S124 "${@:2}" \
      train.max_steps=24 train.log_interval=100 train.eval_interval=0 checkpoint.interval=0 checkpoint.save_at_end=false \
      train.sample_tokens=0 logging.wandb=disabled logging.progress=false run.dir=/tmp/syncs-$1
    grep -A12 "^== \|^-- " "$OUT/syncs-124m-$1.log" | head -60
  done ;;
order124)  # bf16-autocast at 124M against plain PyTorch run before it and again after it (two bench calls)
  part order-124m-1 200 $BENCH --config h100-80gb \
    --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $S124
  part order-124m-2 200 $BENCH --config h100-80gb \
    --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $S124 ;;
trace)  # the 12M and 124M steps (TRACE="12m": one of them) under torch.profiler, bf16-autocast beside
  # plain PyTorch: the traces and tables in $OUT/traces-<size>.tar.gz, compared by tools/trace_gaps.py
  for size in ${TRACE:-12m 124m}; do
    if [ "$size" = 12m ]; then args="--warmup 10 --steps 50 --timeout 150 --baseline $S12"; else args="--warmup 5 --steps 10 --timeout 300 --baseline $S124"; fi
    part trace-$size 200 $DL bench --config h100-80gb --profile /tmp/trace-$size \
      --variant "bf16-autocast: parallel.precision=bf16-autocast parallel.zero_stage=0" $args
    tar czf "$OUT/traces-$size.tar.gz" -C /tmp trace-$size
    python3 tools/trace_gaps.py /tmp/trace-$size/*-trace.json.gz | tee -a "$OUT/trace-$size.log"
  done ;;
fp8loss|fp8loss13)  # 300 steps in bf16 and in fp8 on the same data, 124M (fp8loss) or 1.3B (fp8loss13):
  # 300 x 16,384 tokens, 4.9M. At 1.3B the two do not fit one call (2026-12-03: fp8's first step came
  # 131 s after its trainer started, and more than a minute into its step-100 evaluation it had not finished):
  # PRECISIONS=bf16 in one call, PRECISIONS=fp8 in the next (check that fp8loss-data.log shows the
  # same token counts in both), then dist-lm analyze on the two metrics files. The embedded corpus (0.47M tokens) would repeat ten times; the
  # device's standard library alone gave 2.5M tokens (2026-12-02), so torch's Python sources are added to it
  if [ "$what" = fp8loss13 ]; then shape="$S1300" size=1.3b limit=450; else shape="$S124" size=124m limit=200; fi
  stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  torchdir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  mkdir -p /tmp/stdlib-text
  { find "$stdlib" -name '*.py' -not -path '*-packages*' -size +2k; find "$torchdir" -name '*.py' -size +2k; } |
    head -8000 | while read -r f; do
    iconv -f utf-8 -t utf-8 "$f" >/dev/null 2>&1 && cp "$f" "/tmp/stdlib-text/$(echo "$f" | md5sum | cut -c1-16).txt"; done
  part fp8loss-data 120 $DL prepare /tmp/stdlib-text --out /tmp/stdlib-tokens --vocab-size 32768 --overwrite --quiet
  for p in ${PRECISIONS:-bf16 fp8}; do
    part fp8loss-$size-$p $limit $DL train --config h100-80gb $shape model.vocab_size=null data.dir=/tmp/stdlib-tokens \
      parallel.precision=$p train.max_steps=300 train.global_batch_size=8 optim.warmup_steps=30 train.log_interval=10 \
      train.eval_interval=100 checkpoint.interval=0 checkpoint.save_at_end=false logging.wandb=disabled \
      logging.progress=false run.dir=/tmp/fp8loss-$size-$p
    mkdir -p "$OUT/fp8loss-$size/$p" && cp /tmp/fp8loss-$size-$p/metrics.jsonl "$OUT/fp8loss-$size/$p/"
  done
  [ -z "${PRECISIONS:-}" ] && $DL analyze "$OUT/fp8loss-$size/bf16" "$OUT/fp8loss-$size/fp8" --out "$OUT/fp8loss-$size" ;;
startup)  # the auto plan on this GPU to its first step, each in a directory of its own so that no
  # run reuses another's compile cache (kept beside the run directory): a 3-step run, for which the
  # planner compiles by regions; the whole model (compile_regions=false) in a fresh directory; and
  # the same directory again, with Inductor's cache from the run before (about 300 s in all)
  run="train.max_steps=3 train.log_interval=1 train.eval_interval=0 checkpoint.interval=0 checkpoint.save_at_end=false
    logging.wandb=disabled logging.progress=false"
  rm -rf /tmp/startup-regions /tmp/startup-whole
  part startup-regions 160 $DL train $run run.dir=/tmp/startup-regions/run
  part startup 200 $DL train $run parallel.compile_regions=false run.dir=/tmp/startup-whole/run
  part startup-restart 160 $DL train $run parallel.compile_regions=false run.dir=/tmp/startup-whole/run
  grep -hE "^plan|compile|first step|^step " "$OUT"/startup*.log ;;
caps)  # the auto plans for 12 and 24 GB cards (CAPS="24": one of them), trained under those caps (peak against prediction)
  for cap in ${CAPS:-12 24}; do
    part caps-${cap}gb 240 env DIST_LM_GPU_MEMORY_GB=$cap $DL train train.max_steps=30 train.log_interval=10 \
      train.eval_interval=0 checkpoint.interval=0 checkpoint.save_at_end=false logging.wandb=disabled \
      logging.progress=false run.dir=/tmp/caps-${cap}gb
    grep -E "plan|predicted|first step|mem |out of" "$OUT/caps-${cap}gb.log" | head -12
    cp /tmp/caps-${cap}gb/metrics.jsonl "$OUT/caps-${cap}gb.jsonl"
  done ;;
scaling)  # on two GPUs: the planner's 1.1B preset at ZeRO-1 and ZeRO-2 on one GPU and on two (torchrun)
  part scaling 580 $DL bench --config h100-80gb --warmup 3 --steps 6 --timeout 280 --ranks 1,2 \
    --variant "zero1: parallel.zero_stage=1" --variant "zero2: parallel.zero_stage=2" ;;
scaling3)  # ZeRO-3 with DeepCompile, and fp8 at ZeRO-1, on one GPU and on two
  part scaling3 580 $DL bench --config h100-80gb --warmup 3 --steps 6 --timeout 280 --ranks 1,2 \
    --variant "zero3, DeepCompile: parallel.zero_stage=3 parallel.deepcompile=true" \
    --variant "fp8: parallel.zero_stage=1 parallel.precision=fp8" ;;
launcher)  # the same two-GPU run through the deepspeed launcher, and the two-GPU tests
  part launcher 240 env PATH="/tmp/site/bin:$PATH" deepspeed --num_gpus 2 --module dist_lm train --config h100-80gb parallel.zero_stage=1 \
    train.max_steps=15 train.log_interval=5 train.eval_interval=0 checkpoint.interval=0 checkpoint.save_at_end=false \
    logging.wandb=disabled logging.progress=false run.dir=/tmp/launcher
  grep -E "tok/s|launcher=" "$OUT/launcher.log" | tail -3
  part tests2 330 python3 -m pytest -m gpu2 -q tests/test_gpu2.py ;;
*) echo "unknown part $what"; exit 2 ;;
esac; done
