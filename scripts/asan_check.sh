#!/usr/bin/env bash
# Builds unirec._C with AddressSanitizer (the CMake build, -DUNIREC_SANITIZE=address: -O1, -g1) in a
# copy of the source tree and runs the op fuzz test (tests/test_fuzz_ops.py) against that build: an
# out-of-bounds read or write fails the script. In CI this is also the check that CMakeLists.txt
# builds the same sources as setup.py into a module that loads and runs.
#
# The checkout's own extension is never touched: the sources are copied into $UNIREC_ASAN_DIR/src
# (default /tmp/unirec-asan) and built in $UNIREC_ASAN_DIR/build, so a second run recompiles only the
# files that changed; the module is copied into the copy's unirec/ folder.
#
#   scripts/asan_check.sh [extra pytest arguments]
#
# PYTHON (default .venv/bin/python, else python3) is the interpreter with torch; MAX_JOBS caps the
# parallel compiles (default 2). UNIREC_FUZZ_OPS_CASES and UNIREC_TEST_SEED pass through to the test.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${UNIREC_ASAN_DIR:-/tmp/unirec-asan}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
libasan=$(gcc -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "asan_check: gcc has no libasan.so ($libasan)" >&2; exit 2; }
start=$(date +%s)

# A fresh copy of the tracked and untracked (not ignored) files, so that sources deleted from the tree
# do not linger. Every file gets the copy's time, except one whose content equals the previous copy's:
# it keeps that copy's time, so ninja recompiles exactly the files that changed.
rm -rf "$dir/new"
mkdir -p "$dir/new" "$dir/src" "$dir/build"
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf -) | tar -xmf - -C "$dir/new"
(cd "$dir/new" && find . -type f -print0 |
    while IFS= read -r -d '' f; do cmp -s "$f" "../src/$f" && touch -r "../src/$f" "$f"; done) || true
rm -rf "$dir/src"
mv "$dir/new" "$dir/src"

echo "asan_check: building unirec._C with -fsanitize=address in $dir (CMake)"
prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
# A build folder configured against another torch (another checkout's venv) keeps that torch's
# library paths in its CMake cache; start it afresh.
if [ "$(cat "$dir/build/torch-prefix" 2>/dev/null)" != "$prefix" ]; then
    rm -rf "$dir/build" && mkdir -p "$dir/build" && printf '%s\n' "$prefix" >"$dir/build/torch-prefix"
fi
(cmake -S "$dir/src" -B "$dir/build" -DUNIREC_SANITIZE=address -DPython3_EXECUTABLE="$(command -v "$python")" \
    -DCMAKE_PREFIX_PATH="$prefix" >"$dir/build.log" 2>&1 &&
    cmake --build "$dir/build" -j"${MAX_JOBS:-2}" >>"$dir/build.log" 2>&1) ||
    { tail -n 40 "$dir/build.log" >&2; echo "asan_check: the build failed (log: $dir/build.log)" >&2; exit 2; }
cp "$dir"/build/_C*.so "$dir/src/unirec/"
ext=$(ls "$dir"/src/unirec/_C*.so)
grep -q __asan_init "$ext" || { echo "asan_check: $ext is not instrumented" >&2; exit 2; }
echo "asan_check: built in $(( $(date +%s) - start )) s"

# Python and torch are not instrumented and keep memory to the end: leaks are not what is checked here.
# A huge allocation that the fuzz asks for must fail like it does without ASan (a null, torch's error).
# libstdc++ is preloaded too: python itself does not link it, and ASan must find the real
# __cxa_throw when it starts (else "CHECK failed: ... real___cxa_throw") for C++ exceptions to work.
export LD_PRELOAD="$libasan $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:abort_on_error=1}
export PYTHONPATH=$dir/src
# A fixed count of cases, not the test's short time bound: the same inputs on a fast or a slow machine.
export UNIREC_FUZZ_OPS_CASES=${UNIREC_FUZZ_OPS_CASES:-400} UNIREC_FUZZ_OPS_SECONDS=${UNIREC_FUZZ_OPS_SECONDS:-60}
cd "$dir/src"
loaded=$("$python" -c "import unirec._C as m; print(m.__file__)")
[ "$loaded" = "$ext" ] || { echo "asan_check: python loads $loaded, not the ASan build $ext" >&2; exit 2; }
status=0
"$python" -m pytest tests/test_fuzz_ops.py -q -p no:cacheprovider "$@" || status=$?
# The kernels compiled once per instruction set: the ones this CPU does not pick by default run too.
for isa in avx2 baseline; do
    UNIREC_CPU_ISA=$isa UNIREC_FUZZ_OPS_CASES=${UNIREC_FUZZ_OPS_ISA_CASES:-100} \
        "$python" -m pytest tests/test_fuzz_ops.py -q -p no:cacheprovider \
        -k "tbe or embedding or attention or dropout" "$@" || status=$?
done
echo "asan_check: $([ $status = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
