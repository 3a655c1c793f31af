#!/usr/bin/env bash
# Edit quality on the SmolLM2 pairing (docs/results-smollm2.md): the six canonical-example tasks of
# Hewitt et al. (2024) on val splits, sense-finetuned on backpack-smollm2, ensembled with
# smollm2-135m-instruct at ε ∈ {1e-3, 1e-4, 1e-5}, merged into the layout of the paper's Tables 3 and 4.
# Needs the canonical-examples data (../shared/data/canonical-examples or $SENSEPACK_CANONICAL_DATA).
# About an hour on 2 CPU cores; TASKS="country_capital company_ceo" runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${SENSEPACK_CANONICAL_DATA:-../shared/data/canonical-examples}"
OUT="${OUT:-runs/smollm2}"
TASKS="${TASKS:-country_capital company_ceo stereoset pronoun_gender_bias temporal verb_conjugation}"
MAX_EVAL="${MAX_EVAL:-300}"
TE=.venv/bin/train_edits
[ -d "$DATA/country_capital" ] || { echo "no canonical-examples data at $DATA (set SENSEPACK_CANONICAL_DATA)" >&2; exit 2; }
.venv/bin/sensepack models fetch smollm2-135m-instruct backpack-smollm2
[ -f "$OUT/corpora/G.jsonl" ] || $TE prepare-corpora train_edits/data/owt-val100.jsonl.gz --out "$OUT/corpora" \
  --chunk-len 256 --tokenizer smollm2-135m-instruct
for task in $TASKS; do
  # Hyperparameters chosen on the val split by the Backpack's own success (train_edits sweep is the full search).
  case "$task" in
    country_capital|company_ceo) HP=(-k 8 --lr 0.03 --epochs 8 --max-eval "$MAX_EVAL") ;;
    *)                           HP=(-k 8 --lr 0.01 --epochs 8 --max-eval "$MAX_EVAL") ;;
  esac
  $TE run --task "$task" --data-dir "$DATA" --backpack backpack-smollm2 --large smollm2-135m-instruct \
    --g "$OUT/corpora/G.jsonl" --r "$OUT/corpora/R.jsonl" --g-limit 64 --r-limit 256 "${HP[@]}" \
    --no-eval-every-epoch --run-dir "$OUT/$task"
done
$TE report $(for t in $TASKS; do echo "$OUT/$t"; done) --out "$OUT" --stem tables
echo "tables: $OUT/tables.md"
