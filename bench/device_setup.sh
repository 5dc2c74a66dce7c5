# Source on a GPU machine that has torch/transformers but not zllm's other needs:
# installs the carried wheels (.whl/: msgspec, pyzmq) and zllm itself into /tmp/site.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site .
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
