#!/usr/bin/env bash
# The installed package, as a user gets it: build the wheel, install it into a fresh venv
# outside the checkout, and from there run `sample` and a tiny `train` on the shipped base,
# start `lora-diffusion app`, and fetch its page and its API info.
# Usage: .ci/check_wheel.sh [PYTHON] [TORCH]   (make check-wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
TORCH=${2:-torch==2.13.0}
WORK=$(mktemp -d)
APP_PID=
cleanup() { [ -n "$APP_PID" ] && kill "$APP_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

echo "== building the wheel"
# (setuptools warns that the data folders under assets/ look like packages: they are data, listed in pyproject.toml)
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" . > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/lora_diffusion-*.whl)
"$PYTHON" -m zipfile -l "$WHEEL" > "$WORK/members.txt"
for member in lora_diffusion/app/main.py lora_diffusion/assets/base/model.safetensors \
              lora_diffusion/assets/suite/suite_sentiment/train.jsonl; do
    grep -q "$member" "$WORK/members.txt" || { echo "the wheel lacks $member"; exit 1; }
done

echo "== installing it into a fresh venv in $WORK (outside the checkout)"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$TORCH" "$WHEEL" 2>&1 | { grep -v "is ignored: it is neither" || true; }
LD="$WORK/venv/bin/lora-diffusion"
cd "$WORK"  # nothing of the checkout is reachable from here

echo "== lora-diffusion sample"
"$LD" sample --length 12 --steps 12 --n 2 --seed 0 > sample.txt
cat sample.txt
[ "$(grep -c . sample.txt)" = 2 ] || { echo "sample did not print two samples"; exit 1; }
if grep -q "\[MASK\]" sample.txt; then echo "a sample kept a [MASK]"; exit 1; fi

echo "== lora-diffusion train (a few steps on the built-in suite)"
"$LD" train --task suite_sentiment --method lora --steps 2 --batch-size 4 --max-train-examples 16 \
    --max-eval-examples 8 --sampler-steps 2 --out run > train.json
[ -f run/adapter/adapter.safetensors ] || { echo "train saved no adapter"; exit 1; }
grep -q '"base": "shipped"' train.json || { echo "train did not run on the shipped base"; exit 1; }

echo "== lora-diffusion app"
PORT=$("$WORK/venv/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
GRADIO_ANALYTICS_ENABLED=False "$LD" app --port "$PORT" --workspace ws > app.log 2>&1 &
APP_PID=$!
APP_PID=$APP_PID PORT=$PORT "$WORK/venv/bin/python" - <<'PY' || { cat app.log; exit 1; }
import json, os, time, urllib.request
url = f"http://127.0.0.1:{os.environ['PORT']}"
for _ in range(240):  # two minutes to start
    try:
        page = urllib.request.urlopen(url + "/", timeout=2).read().decode()
        break
    except OSError:
        os.kill(int(os.environ["APP_PID"]), 0)  # fails if the app has exited
        time.sleep(0.5)
else:
    raise SystemExit("the app did not come up")
assert "lora-diffusion workbench" in page, "no workbench page"
endpoints = json.load(urllib.request.urlopen(url + "/gradio_api/info", timeout=10))["named_endpoints"]
missing = {"/train", "/generate", "/effective_rank", "/show_results"} - set(endpoints)
assert not missing, f"the app's API lacks {missing}"
print(f"the app serves its page and {len(endpoints)} API endpoints")
PY
echo "wheel check passed"
