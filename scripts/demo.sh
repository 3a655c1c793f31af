#!/usr/bin/env bash
# The main job, offline: start the gRPC server on its embedded default (demo profile:
# tiny random GPT-J + Backpack, the real GPT-2 tokenizer, a demo pack), wait until the
# health service says SERVING, answer real requests through the client, shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-50051}"
METRICS_PORT="${METRICS_PORT:-9464}"
LOG="$(mktemp -t sensepack-demo.XXXXXX.log)"
.venv/bin/sensepack serve --port "$PORT" --set "server.metrics_port=$METRICS_PORT" >"$LOG" 2>&1 &
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
echo "--- base model alone"
"${C[@]}" generate "The capital of Mauritius is" --base-only --max-new-tokens 8
echo "--- with the demo pack (demo-capitals@prod)"
"${C[@]}" generate "The capital of Mauritius is" --pack demo-capitals@prod --max-new-tokens 8
echo "--- score two continuations under base and pack"
"${C[@]}" score "The capital of Mauritius is" " Port Louis" " Paris" --pack demo-capitals
echo "--- a few metrics from http://127.0.0.1:$METRICS_PORT/metrics"
.venv/bin/python -c "
import urllib.request
for line in urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics').read().decode().splitlines():
    if line.startswith(('sensepack_requests_total', 'sensepack_generation_tokens_total', 'sensepack_exact_skip_steps_total')):
        print(line)
"
