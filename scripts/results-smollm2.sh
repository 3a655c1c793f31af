#!/usr/bin/env bash
# Edit quality on the SmolLM2 pairing (docs/results-smollm2.md): the six canonical-example tasks of
# Hewitt et al. (2024) on val splits, sense-finetuned on the pairing's sense model (SENSE, default sense-smollm2 with
# the pairing's defaults from train_edits/pairings.py; SENSE=backpack-smollm2 for the stand-alone Backpack with its
# hand-set hyperparameters), ensembled with smollm2-135m-instruct at ε ∈ {1e-3, 1e-4, 1e-5}, merged into the
# layout of the paper's Tables 3 and 4.
# Needs the canonical-examples data (../shared/data/canonical-examples or $SENSEPACK_CANONICAL_DATA).
# About an hour on 2 CPU cores; TASKS="country_capital company_ceo" runs a subset.
# PROTOCOL=1 then runs the multi-seed protocol with the baselines (docs/results-smollm2.md, "Baselines and
# error bars"): PROTOCOL_TASKS (default country_capital), SEEDS (3), METHODS (senses lora-backpack
# full-backpack, each with its own lr below), reduced sizes PMAX_TRAIN / PMAX_EVAL / PEPOCHS; tables in
# $OUT/protocol/tables.md. The full protocol: SEEDS=10 FULL_SEEDS=10, PMAX_TRAIN=0 (all), PMAX_EVAL=0, PEPOCHS=8, and
# METHODS adding full-large lora-large (hours per seed on CPU: a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${SENSEPACK_CANONICAL_DATA:-../shared/data/canonical-examples}"
OUT="${OUT:-runs/smollm2}"
TASKS="${TASKS:-country_capital company_ceo stereoset pronoun_gender_bias temporal verb_conjugation}"
MAX_EVAL="${MAX_EVAL:-300}"
TE=.venv/bin/train_edits
[ -d "$DATA/country_capital" ] || { echo "no canonical-examples data at $DATA (set SENSEPACK_CANONICAL_DATA)" >&2; exit 2; }
SENSE="${SENSE:-sense-smollm2}"
.venv/bin/sensepack models fetch smollm2-135m-instruct "$SENSE"
[ -f "$OUT/corpora/G.jsonl" ] || $TE prepare-corpora train_edits/data/owt-val100.jsonl.gz --out "$OUT/corpora" \
  --chunk-len 256 --tokenizer smollm2-135m-instruct
for task in $TASKS; do
  # sense-smollm2: the pairing's defaults (chosen on country_capital val); backpack-smollm2: hyperparameters
  # chosen on the val split by the Backpack's own success (train_edits sweep is the full search).
  if [ "$SENSE" = sense-smollm2 ]; then
    HP=(--max-eval "$MAX_EVAL")
  else
    case "$task" in
      country_capital|company_ceo) HP=(-k 8 --lr 0.03 --epochs 8 --max-eval "$MAX_EVAL") ;;
      *)                           HP=(-k 8 --lr 0.01 --epochs 8 --max-eval "$MAX_EVAL") ;;
    esac
  fi
  $TE run --task "$task" --data-dir "$DATA" --backpack "$SENSE" --large smollm2-135m-instruct \
    --g "$OUT/corpora/G.jsonl" --r "$OUT/corpora/R.jsonl" --g-limit 64 --r-limit 256 "${HP[@]}" \
    --no-eval-every-epoch --run-dir "$OUT/$task"
done
$TE report $(for t in $TASKS; do echo "$OUT/$t"; done) --out "$OUT" --stem tables
echo "tables: $OUT/tables.md"

[ "${PROTOCOL:-0}" = 1 ] || exit 0
SEEDS="${SEEDS:-3}"
METHODS="${METHODS:-senses lora-backpack full-backpack}"
PMAX_TRAIN="${PMAX_TRAIN:-40}"; PMAX_EVAL="${PMAX_EVAL:-100}"; PEPOCHS="${PEPOCHS:-3}"
LIMITS=()
[ "$PMAX_TRAIN" = 0 ] || LIMITS+=(--max-train "$PMAX_TRAIN")
[ "$PMAX_EVAL" = 0 ] || LIMITS+=(--max-eval "$PMAX_EVAL")
for task in ${PROTOCOL_TASKS:-country_capital}; do
  for m in $METHODS; do
    case "$m" in  # not swept: the sense lr of the runs above; baselines inside upstream's sweep ranges
      senses) LR=0.03 ;; lora-backpack) LR=1e-3 ;; full-backpack) LR=1e-5 ;; lora-large) LR=1e-4 ;; full-large) LR=1e-6 ;;
    esac
    n="$SEEDS"; [ "$m" = full-backpack ] && n="${FULL_SEEDS:-1}"  # the slowest on CPU: 1 seed unless FULL_SEEDS
    $TE protocol --task "$task" --data-dir "$DATA" --backpack "$SENSE" --large smollm2-135m-instruct \
      --g "$OUT/corpora/G.jsonl" --r "$OUT/corpora/R.jsonl" --g-limit 32 --r-limit 64 "${LIMITS[@]}" \
      --epochs "$PEPOCHS" -k 8 --no-eval-every-epoch --methods "$m" --lr "$LR" --seeds "$n" \
      --run-dir "$OUT/protocol/$task"
  done
done
$TE table $(for t in ${PROTOCOL_TASKS:-country_capital}; do echo "$OUT/protocol/$t"; done) --out "$OUT/protocol"
echo "protocol tables: $OUT/protocol/tables.md"
